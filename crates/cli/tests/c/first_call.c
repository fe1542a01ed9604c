/* A program whose first act in main is to call the vulnerable function: started after a fix
 * is live, it must print the fixed answer (-1), never the old one (3), on that first call.
 * -DLIBRARY: the function comes from libfirst.so (linked, or with -DDLOPEN loaded by dlopen
 * after a second thread is already running). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#ifdef DLOPEN
#include <dlfcn.h>
#include <pthread.h>
static void *spin(void *arg) { for (volatile long i = 0;; i++) (void)arg; return NULL; }
#endif

#ifdef LIBRARY
int first_check(const char *s);
#else
__attribute__((noinline)) int first_check(const char *s) {
    int n = 0;
    while (*s) n += *s++ == 'a';
    return n;
}
#endif

int main(int argc, char **argv) {
#ifdef DLOPEN
    pthread_t t;
    pthread_create(&t, NULL, spin, NULL);
    void *h = dlopen(argc > 1 ? argv[1] : "libfirst.so", RTLD_NOW);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    int (*check)(const char *) = (int (*)(const char *))dlsym(h, "first_check");
    printf("%d\n", check("banana"));
#else
    printf("%d\n", first_check("banana"));
    fflush(stdout);
    /* --stay: keep running (a service that maps the file, as in a container). */
    if (argc > 1 && strcmp(argv[1], "--stay") == 0) pause();
#endif
    return 0;
}
