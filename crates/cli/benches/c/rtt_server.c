/* A single-threaded request/response server (the shape of Redis: one thread serves every
 * client). Usage: rtt_server PORT. Each 8-byte request x is answered with handle(x). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

__attribute__((noinline)) long handle(long x) { return x * 7 + 1; }

int main(int argc, char **argv) {
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
