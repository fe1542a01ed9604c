/* A request/response server served by one thread (the shape of Redis: one thread serves every
 * client, a few background threads sleep until given work). Usage: rtt_server PORT [IDLE]:
 * IDLE background threads wait on a condition variable. Each 8-byte request x is answered
 * with handle(x). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

__attribute__((noinline)) long handle(long x) { return x * 7 + 1; }

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER;

static void *background(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    for (;;) pthread_cond_wait(&work, &lock);
    return NULL;
}

int main(int argc, char **argv) {
    for (int i = 0; i < (argc > 2 ? atoi(argv[2]) : 0); i++) {
        pthread_t t;
        pthread_create(&t, NULL, background, NULL);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) return 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    int c = accept(s, NULL, NULL);
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    long x;
    while (read(c, &x, sizeof x) == sizeof x) {
        long y = handle(x);
        if (write(c, &y, sizeof y) != sizeof y) break;
    }
    return 0;
}
