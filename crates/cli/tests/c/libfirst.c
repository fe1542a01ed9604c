/* The library target of first_call.c. */
__attribute__((noinline)) int first_check(const char *s) {
    int n = 0;
    while (*s) n += *s++ == 'a';
    return n;
}
