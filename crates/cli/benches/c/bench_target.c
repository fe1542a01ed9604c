/* Benchmark target. Usage: bench_target THREADS
 * THREADS worker threads keep running (calling other code and sleeping briefly), as in a busy
 * service; the main thread answers on stdin:
 *   "calls N" -> time N calls of hot() and print calls per second
 * f0..f19 are the functions the pause benchmark replaces. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int hot(int x) { return x * 3 + 1; }

#define F(n) __attribute__((noinline)) int f##n(int x) { return x * (n + 3) + n + 1000; }
F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9)
F(10) F(11) F(12) F(13) F(14) F(15) F(16) F(17) F(18) F(19)

static volatile long sink;

static void *work(void *arg) {
    (void)arg;
    for (long i = 0;; i++) {
        sink += i * 7;
        if (i % 4096 == 0) usleep(100);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 0;
    for (int i = 0; i < n - 1; i++) { pthread_t t; pthread_create(&t, NULL, work, NULL); }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long calls = 0;
        if (sscanf(line, "calls %ld", &calls) == 1) {
            int (*volatile fp)(int) = hot;
            struct timespec a, b;
            clock_gettime(CLOCK_MONOTONIC, &a);
            int acc = 0;
            for (long i = 0; i < calls; i++) acc += fp((int)i);
            clock_gettime(CLOCK_MONOTONIC, &b);
            double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
            sink += acc;
            printf("%.0f\n", calls / s);
        } else printf("?\n");
    }
    return 0;
}
