/* c-ares: the DNS reply parsers and the sortlist/address parsers (no network). */
#include <ares.h>
#include <arpa/nameser.h>
#include <string.h>
#include <stdlib.h>
#include <netdb.h>
#include <sys/socket.h>

/* A reply to "example.com A": header, question, one answer. */
static const unsigned char reply[] = {
    0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0,
    7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 3, 'c', 'o', 'm', 0, 0, 1, 0, 1,
    0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4, 93, 184, 216, 34};

long work(unsigned long i) {
    static int init;
    long r = 0;
    if (!init) {
        ares_library_init(ARES_LIB_INIT_ALL);
        init = 1;
    }
    struct hostent *he = NULL;
    struct ares_addrttl ttls[4];
    int n = 4;
    if (ares_parse_a_reply(reply, sizeof reply, &he, ttls, &n) == ARES_SUCCESS) {
        r += n + (long)strlen(he->h_name);
        ares_free_hostent(he);
    }
    ares_channel ch;
    struct ares_options o;
    memset(&o, 0, sizeof o);
    if (ares_init_options(&ch, &o, 0) == ARES_SUCCESS) {
        r += ares_set_sortlist(ch, (i & 1) ? "130.155.160.0/255.255.240.0 130.155.0.0" : "10.0.0.0/8");
        ares_destroy(ch);
    }
    char *buf = NULL;
    int len = 0;
    if (ares_create_query("www.example.org", 1, 1, 0x1234, 0, (unsigned char **)&buf, &len, 0) == ARES_SUCCESS) {
        r += len;
        ares_free_string(buf);
    }
    unsigned char a6[16];
    r += ares_inet_pton(AF_INET6, (i & 1) ? "::ffff:1.2.3.4" : "2001:db8::1", a6);
    return r;
}
