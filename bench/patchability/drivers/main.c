/* Driver of the patchability bench: a long-running process that uses the deployed library.
 * A worker thread calls work() (drivers/PKG.c) in a loop, so the patched functions run while
 * the patch goes in and out; each line on stdin is answered with one line on stdout after one
 * more call of work() from the main thread: "ok ITERATIONS RESULT". */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

long work(unsigned long i);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile unsigned long iterations;

static void *worker(void *arg) {
    (void)arg;
    for (unsigned long i = 0;; i++) {
        pthread_mutex_lock(&lock);
        work(i);
        iterations++;
        pthread_mutex_unlock(&lock);
        usleep(500);
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    char line[256];
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pthread_create(&t, NULL, worker, NULL) != 0)
        return 1;
    while (fgets(line, sizeof line, stdin)) {
        pthread_mutex_lock(&lock);
        long r = work(0);
        unsigned long n = iterations;
        pthread_mutex_unlock(&lock);
        printf("ok %lu %ld\n", n, r);
    }
    return 0;
}
