/* A tiny multi-threaded "access service" with a real bug, used by `suture demo`.
 *
 * Clients connect to a Unix socket and send one line:
 *   LOGIN <user>   -> "granted admin" | "granted user"
 *   STATS          -> "pid=<pid> requests=<n> admin_checks_denied=<n>"
 * Four background threads keep calling the access check, as a busy service would.
 *
 * The bug (an authentication bypass, the CVE-2012-2122 family): is_admin() compares only as
 * many characters as the client sent, so "ad", "r" or the empty name count as admins.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static const char *admins[] = {"admin", "root", NULL};
long requests;        /* state that must survive the patch */
long admin_checks_denied;
static volatile long traffic_admins; /* keeps gcc from dropping the calls below */

/* noinline: a hand-made patch replaces this function; `suture build` would also find callers
 * that inlined it. */
__attribute__((noinline)) int is_admin(const char *user) {
    for (int i = 0; admins[i]; i++)
        if (strncmp(user, admins[i], strlen(user)) == 0) /* BUG: prefix match */
            return 1;
    return 0;
}

static void *traffic(void *arg) {
    (void)arg;
    const char *names[] = {"alice", "bob", "root", "carol"};
    for (unsigned i = 0;; i++) {
        if (is_admin(names[i % 4])) traffic_admins++;
        usleep(200);
    }
    return NULL;
}

static void *serve(void *arg) {
    int fd = (int)(long)arg;
    char line[256];
    ssize_t n = read(fd, line, sizeof line - 1);
    if (n > 0) {
        line[n] = 0;
        line[strcspn(line, "\r\n")] = 0;
        char out[128];
        __atomic_add_fetch(&requests, 1, __ATOMIC_SEQ_CST);
        if (strncmp(line, "LOGIN ", 6) == 0)
            snprintf(out, sizeof out, "%s\n", is_admin(line + 6) ? "granted admin" : "granted user");
        else if (strcmp(line, "STATS") == 0)
            snprintf(out, sizeof out, "pid=%d requests=%ld admin_checks_denied=%ld\n", getpid(), requests,
                     admin_checks_denied);
        else
            snprintf(out, sizeof out, "unknown command\n");
        if (write(fd, out, strlen(out)) < 0) { /* client gone */ }
    }
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s SOCKET\n", argv[0]); return 2; }
    signal(SIGPIPE, SIG_IGN);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    unlink(argv[1]);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 64)) { perror("bind"); return 1; }
    for (int i = 0; i < 4; i++) {
        pthread_t t;
        pthread_create(&t, NULL, traffic, NULL);
    }
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        pthread_t t;
        pthread_create(&t, NULL, serve, (void *)(long)c);
        pthread_detach(t);
    }
}
