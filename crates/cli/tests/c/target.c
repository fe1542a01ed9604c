/* Test target: a line-oriented service on stdin/stdout. Built as PIE, non-PIE, static, or
 * against libcalc.so (-DUSE_LIB), by the integration tests. */
#include <dlfcn.h>
#include <limits.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int counter;                  /* global state the patch must share */
#ifdef OTHER_BUILD
int other_build_marker = 1;
#endif
static int secret_factor = 3; /* static state the patch must share */

#ifdef USE_LIB
int compute(int x); /* in libcalc.so */
void set_lib_factor(int f);
#else
static __attribute__((noinline)) int helper(int x) { return x * secret_factor; }
__attribute__((noinline)) int compute(int x) {
    counter++;
    return helper(x) + 1;
}
#endif

__attribute__((noinline)) const char *greet(void) { return "old greeting"; }

__thread int tls_hits; /* thread-local state of the executable */
__attribute__((noinline)) int touch_tls(void) { return ++tls_hits; }
__attribute__((noinline)) int zero(void) { return 0; }

/* A function a thread stays inside of (it sleeps in a loop in here). */
__attribute__((noinline)) int blocker(int n) {
    for (;;) {
        usleep(1000 * n);
        __asm__ volatile("" ::: "memory");
    }
    return n;
}

int (*stored_ptr)(int); /* a pointer taken before any patch */

static volatile long calls, bad;
static volatile int spinning;

static void *spin(void *arg) {
    (void)arg;
    while (spinning) {
        int r = compute(2);
        /* Every call answers the old (7) or a patched behaviour (106, 206), never garbage. */
        if (r != 7 && r != 106 && r != 206) __atomic_add_fetch(&bad, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

/* Creates short-lived threads that call compute(), without end: threads are born and die
 * while suture stops the process. */
static void *short_lived(void *arg) {
    (void)arg;
    int r = compute(2);
    if (r != 7 && r != 106 && r != 206) __atomic_add_fetch(&bad, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void *churn(void *arg) {
    (void)arg;
    for (;;) {
        pthread_t t;
        if (pthread_create(&t, NULL, short_lived, NULL) == 0) pthread_join(t, NULL);
    }
    return NULL;
}

static void *block(void *arg) {
    (void)arg;
    blocker(100000); /* sleeps 100 s at a time: the thread stays idle inside */
    return NULL;
}

/* Sleeps with a word in a live frame that points into compute(), as a stale return address
 * or a code pointer kept in a local does: no return address, but a conservative scan of the
 * stack cannot tell. */
static void *stale(void *arg) {
    volatile unsigned long word = (unsigned long)compute + 1;
    (void)arg;
    for (;;) {
        usleep(100000000);
        __asm__ volatile("" ::"r"(&word) : "memory");
    }
    return NULL;
}

/* Installs a seccomp filter on the calling thread (no new privileges first, as unprivileged
 * code must). */
static int install_filter(struct sock_filter *f, unsigned short n) {
    struct sock_fprog prog = {n, f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

/* systemd's MemoryDenyWriteExecute=yes: no mapping both writable and executable, and no
 * mprotect or pkey_mprotect that adds PROT_EXEC (EPERM). */
static int deny_write_execute(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mmap, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2])),
        BPF_STMT(BPF_ALU | BPF_AND | BPF_K, PROT_WRITE | PROT_EXEC),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PROT_WRITE | PROT_EXEC, 5, 4),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mprotect, 1, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_pkey_mprotect, 0, 2),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2])),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, PROT_EXEC, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 1),
    };
    return install_filter(f, sizeof f / sizeof f[0]);
}

/* vforks a child that sleeps `arg` milliseconds in the parent's memory (as a child does until
 * it execs), then exits; this thread waits in vfork meanwhile, and reaps it. */
static void *vforker(void *arg) {
    long ms = (long)arg;
    pid_t c = vfork();
    if (c == 0) {
        struct timespec t = {ms / 1000, (ms % 1000) * 1000000};
        syscall(SYS_nanosleep, &t, NULL);
        _exit(0);
    }
    if (c > 0) waitpid(c, NULL, 0);
    return NULL;
}

/* A seccomp filter that makes system call `nr` fail with EPERM and allows the rest. */
static int deny_syscall(int nr) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    return install_filter(f, sizeof f / sizeof f[0]);
}

/* The command loop; `leave` hands it to a new thread and ends the calling one (the main
 * thread then becomes a zombie while the process lives on). */
static void *serve(void *arg) {
    char line[128];
    if (arg) printf("ok\n");
    while (fgets(line, sizeof line, stdin)) {
        int n = 0;
        if (sscanf(line, "compute %d", &n) == 1) printf("%d\n", compute(n));
        else if (sscanf(line, "ptr %d", &n) == 1) printf("%d\n", stored_ptr(n));
        else if (sscanf(line, "factor %d", &n) == 1) {
            secret_factor = n;
#ifdef USE_LIB
            set_lib_factor(n);
#endif
            printf("ok\n");
        }
        else if (strncmp(line, "counter", 7) == 0) printf("%d\n", counter);
        else if (strncmp(line, "greet", 5) == 0) printf("%s\n", greet());
        else if (strncmp(line, "zero", 4) == 0) printf("%d\n", zero());
        else if (sscanf(line, "spin %d", &n) == 1) {
            spinning = 1;
            for (int i = 0; i < n; i++) { pthread_t t; pthread_create(&t, NULL, spin, NULL); }
            printf("ok\n");
        } else if (strncmp(line, "churn", 5) == 0) {
            pthread_t t; pthread_create(&t, NULL, churn, NULL); printf("ok\n");
        } else if (strncmp(line, "tls", 3) == 0) printf("%d\n", touch_tls());
        else if (strncmp(line, "stats", 5) == 0) printf("%ld %ld\n", calls, bad);
        else if (strncmp(line, "stale", 5) == 0) {
            pthread_t t; pthread_create(&t, NULL, stale, NULL); usleep(20000); printf("ok\n");
        } else if (strncmp(line, "block", 5) == 0) {
            pthread_t t; pthread_create(&t, NULL, block, NULL); usleep(20000); printf("ok\n");
        } else if (sscanf(line, "vfork %d", &n) == 1) {
            pthread_t t; pthread_create(&t, NULL, vforker, (void *)(long)n); pthread_detach(t);
            usleep(20000); printf("ok\n");
        } else if (strncmp(line, "smallstack", 10) == 0) {
            /* A sleeping thread on the smallest stack there is, and a main thread that has
             * used more CPU: the small one is the quietest. */
            struct timespec t0, t1;
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
            do clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
            while ((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec) < 60000000L);
            pthread_attr_t at; pthread_attr_init(&at); pthread_attr_setstacksize(&at, PTHREAD_STACK_MIN);
            pthread_t t; pthread_create(&t, &at, block, NULL); usleep(20000); printf("ok\n");
        } else if (strncmp(line, "dlopen ", 7) == 0) {
            line[strcspn(line, "\n")] = 0;
            printf("%s\n", dlopen(line + 7, RTLD_NOW) ? "ok" : dlerror());
        } else if (strncmp(line, "seccomp mdwe", 12) == 0) printf("%d\n", deny_write_execute());
        else if (strncmp(line, "prctl mdwe", 10) == 0) printf("%d\n", prctl(65 /* PR_SET_MDWE */, 1 /* REFUSE_EXEC_GAIN */, 0, 0, 0));
        else if (strncmp(line, "seccomp memfd", 13) == 0) printf("%d\n", deny_syscall(SYS_memfd_create));
        else if (strncmp(line, "seccomp reboot", 14) == 0) printf("%d\n", deny_syscall(SYS_reboot));
        else if (strncmp(line, "leave", 5) == 0) {
            pthread_t t; pthread_create(&t, NULL, serve, (void *)1); pthread_exit(NULL);
        } else if (strncmp(line, "quit", 4) == 0) break;
        else printf("?\n");
    }
    return NULL;
}

int main(void) {
    stored_ptr = compute;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    serve(NULL);
    return 0;
}
