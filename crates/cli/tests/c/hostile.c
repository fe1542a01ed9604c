/* Target of the fault-injection tests: a service whose threads check, all the time, that
 * nothing suture does (or leaves behind when it dies) corrupts them.
 *   - spinners call compute() and check every answer (old 7 or patched 106);
 *   - a vector thread keeps known values in xmm8-xmm15 and checks them (FPU state restored);
 *   - the main thread sits in read() (a restartable system call) and a sleeper in nanosleep;
 *   - a SIGRTMIN+2 handler counts signals (none may be lost);
 *   - optional: a thread calling setgid() in a loop (glibc signals every thread: SIGSETXID),
 *     a thread that forks every 3 ms, children checking they are clean or fully patched;
 *     a thread with a double-close bug: it closes whatever holds one descriptor number and
 *     opens a file ("victim") in its place, over and over. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int compute(int x) { return x * 3 + 1; }

static volatile long calls, bad, fpbad, fpchecks, rtsignals, setgids, forks, forkbad, sleeps,
    reuses;
static char victim[256];
static int reused_fd;

static void *spin(void *arg) {
    (void)arg;
    for (;;) {
        int r = compute(2);
        if (r != 7 && r != 106) __atomic_add_fetch(&bad, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

/* Loads 8 known vectors into xmm8-15 and checks them after a pause, forever. */
static void *vectors(void *arg) {
    (void)arg;
    static const long long want[16] __attribute__((aligned(16))) = {
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    for (;;) {
        long long got[16] __attribute__((aligned(16)));
        __asm__ volatile(
            "movdqa 0(%1), %%xmm8\n movdqa 16(%1), %%xmm9\n movdqa 32(%1), %%xmm10\n"
            "movdqa 48(%1), %%xmm11\n movdqa 64(%1), %%xmm12\n movdqa 80(%1), %%xmm13\n"
            "movdqa 96(%1), %%xmm14\n movdqa 112(%1), %%xmm15\n"
            "mov $200000, %%ecx\n 1: pause\n dec %%ecx\n jnz 1b\n"
            "movdqa %%xmm8, 0(%0)\n movdqa %%xmm9, 16(%0)\n movdqa %%xmm10, 32(%0)\n"
            "movdqa %%xmm11, 48(%0)\n movdqa %%xmm12, 64(%0)\n movdqa %%xmm13, 80(%0)\n"
            "movdqa %%xmm14, 96(%0)\n movdqa %%xmm15, 112(%0)\n"
            :
            : "r"(got), "r"(want)
            : "rcx", "memory", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",
              "xmm15");
        if (memcmp(got, want, sizeof want)) __atomic_add_fetch(&fpbad, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&fpchecks, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) {
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
        __atomic_add_fetch(&sleeps, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static void on_rt(int sig) {
    (void)sig;
    __atomic_add_fetch(&rtsignals, 1, __ATOMIC_SEQ_CST);
}

static void *setgid_loop(void *arg) {
    (void)arg;
    for (;;) {
        if (setgid(getgid()) == 0) __atomic_add_fetch(&setgids, 1, __ATOMIC_SEQ_CST);
        usleep(500);
    }
    return NULL;
}

/* A child is consistent if it carries patch memory exactly when compute() is patched. */
static int child_consistent(void) {
    char buf[1 << 16];
    int fd = open("/proc/self/maps", O_RDONLY);
    if (fd < 0) return 1;
    ssize_t n, len = 0;
    while ((n = read(fd, buf + len, sizeof buf - 1 - len)) > 0) len += n;
    close(fd);
    buf[len] = 0;
    int mapped = strstr(buf, "memfd:suture:") != NULL;
    int patched = compute(2) == 106;
    return mapped == patched;
}

static void *forker(void *arg) {
    (void)arg;
    for (;;) {
        pid_t c = fork();
        if (c == 0) _exit(child_consistent() ? 0 : 1);
        if (c > 0) {
            int st;
            waitpid(c, &st, 0);
            __atomic_add_fetch(&forks, 1, __ATOMIC_SEQ_CST);
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                __atomic_add_fetch(&forkbad, 1, __ATOMIC_SEQ_CST);
        }
        usleep(3000);
    }
    return NULL;
}

static void *fd_reuser(void *arg) {
    (void)arg;
    for (;;) {
        close(reused_fd); /* the bug: whatever holds the number now */
        int f = open(victim, O_RDWR);
        if (f >= 0 && f != reused_fd) close(f);
        __atomic_add_fetch(&reuses, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static void start(void *(*f)(void *)) {
    pthread_t t;
    pthread_create(&t, NULL, f, NULL);
}

int main(void) {
    char line[128];
    signal(SIGRTMIN + 2, on_rt);
    setvbuf(stdout, NULL, _IOLBF, 0);
    start(spin);
    start(spin);
    start(vectors);
    start(sleeper);
    printf("ready %d\n", getpid());
    /* fgets sits in read(2): the main thread (the one suture injects through) is in a
     * restartable system call most of the time. */
    while (fgets(line, sizeof line, stdin)) {
        int n = 0;
        if (sscanf(line, "compute %d", &n) == 1) printf("%d\n", compute(n));
        else if (strncmp(line, "setgid", 6) == 0) { start(setgid_loop); printf("ok\n"); }
        else if (strncmp(line, "fork", 4) == 0) { start(forker); printf("ok\n"); }
        else if (sscanf(line, "fdreuse %255s", victim) == 1) {
            reused_fd = open("/dev/null", O_RDONLY); /* the lowest free number */
            close(reused_fd);
            start(fd_reuser);
            printf("ok\n");
        }
        else if (strncmp(line, "stats", 5) == 0)
            printf("calls=%ld bad=%ld fpchecks=%ld fpbad=%ld rt=%ld setgid=%ld forks=%ld "
                   "forkbad=%ld sleeps=%ld reuses=%ld\n",
                   calls, bad, fpchecks, fpbad, rtsignals, setgids, forks, forkbad, sleeps,
                   reuses);
        else if (strncmp(line, "quit", 4) == 0) break;
        else printf("?\n");
    }
    return 0;
}
