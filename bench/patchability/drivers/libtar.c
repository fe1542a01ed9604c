/* libtar: write a small archive (GNU long names) and read it back. */
#include <libtar.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

long work(unsigned long i) {
    static int init;
    long r = 0;
    if (!init) {
        FILE *f = fopen("member-with-a-rather-long-name-to-need-gnu-long-names-in-the-header-"
                        "block-of-the-archive-because-it-is-over-one-hundred-bytes.txt", "w");
        if (f) { fputs("hello\n", f); fclose(f); }
        init = 1;
    }
    if ((i & 63) != 0) return 0; /* every 64th call from the worker; always from main */
    TAR *t;
    if (tar_open(&t, "bench.tar", NULL, O_WRONLY | O_CREAT | O_TRUNC, 0644, TAR_GNU) == 0) {
        tar_append_file(t, "member-with-a-rather-long-name-to-need-gnu-long-names-in-the-header-"
                           "block-of-the-archive-because-it-is-over-one-hundred-bytes.txt",
                        "member-with-a-rather-long-name-to-need-gnu-long-names-in-the-header-"
                        "block-of-the-archive-because-it-is-over-one-hundred-bytes.txt");
        tar_append_eof(t);
        tar_close(t);
    }
    if (tar_open(&t, "bench.tar", NULL, O_RDONLY, 0, TAR_GNU) == 0) {
        while (th_read(t) == 0) {
            r += (long)strlen(th_get_pathname(t)) + (long)th_get_size(t);
            if (TH_ISREG(t)) tar_skip_regfile(t);
        }
        tar_close(t);
    }
    return r;
}
