/* Adds 100 to the running thread's own copy of the executable's thread-local counter. */
extern __thread int tls_hits;
int touch_tls(void) {
    tls_hits += 100;
    return tls_hits;
}
