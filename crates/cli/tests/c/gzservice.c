/* A long-running service using zlib: "gzhead" inflates a gzip stream whose header carries a
 * 64-byte extra field into a gz_header with room for 16, one input byte at a time: the
 * trigger of CVE-2022-37434 (heap overflow in inflate). "version" answers zlibVersion(). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

static const char *gzhead(void) {
    unsigned char in[10 + 2 + 64 + 10];
    size_t n = 0;
    const unsigned char h[] = {0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 3}; /* FLG.FEXTRA */
    memcpy(in, h, sizeof h);
    n = sizeof h;
    in[n++] = 64;
    in[n++] = 0;
    for (int i = 0; i < 64; i++) in[n++] = (unsigned char)('A' + i % 26);
    in[n++] = 0x03; /* empty final block */
    in[n++] = 0x00;
    for (int i = 0; i < 8; i++) in[n++] = 0;
    struct { unsigned char extra[16]; unsigned char canary[64]; } buf;
    memset(&buf, 0, sizeof buf);
    memset(buf.canary, 0x5a, sizeof buf.canary);
    gz_header head;
    memset(&head, 0, sizeof head);
    head.extra = buf.extra;
    head.extra_max = sizeof buf.extra;
    z_stream s;
    memset(&s, 0, sizeof s);
    if (inflateInit2(&s, 16 + 15) != Z_OK) return "init failed";
    inflateGetHeader(&s, &head);
    unsigned char out[64];
    int ret = Z_OK;
    for (size_t i = 0; i < n && ret == Z_OK; i++) {
        s.next_in = in + i;
        s.avail_in = 1;
        s.next_out = out;
        s.avail_out = sizeof out;
        ret = inflate(&s, Z_NO_FLUSH);
    }
    inflateEnd(&s);
    for (int i = 0; i < 64; i++)
        if (buf.canary[i] != 0x5a) return "canary overwritten";
    return memcmp(buf.extra, "ABCDEFGHIJKLMNOP", 16) == 0 ? "ok" : "extra field wrong";
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "gzhead", 6) == 0) printf("%s\n", gzhead());
        else if (strncmp(line, "version", 7) == 0) printf("%s\n", zlibVersion());
        else printf("?\n");
    }
    return 0;
}
