/* A replacement for blocker() that a thread stays inside of until the target's `counter`
 * moves (the `compute` command), then ends the thread from in here (blocker never returns:
 * its callers have no code after the call). */
extern int COUNTER;
struct timespec_ { long s, ns; };
extern int nanosleep(const struct timespec_ *, struct timespec_ *);
extern long syscall(long, ...);
int blocker(int n) {
    int start = COUNTER;
    struct timespec_ t = {0, 1000000};
    while (COUNTER == start) nanosleep(&t, 0);
    for (;;) syscall(60 /* SYS_exit: this thread only */, 0);
    return n;
}
