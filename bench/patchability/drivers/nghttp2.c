/* nghttp2: a server session fed a client connection preface, SETTINGS, HEADERS (with a
 * CONTINUATION), and RST_STREAM frames from memory; HPACK deflate/inflate. */
#include <nghttp2/nghttp2.h>
#include <string.h>

static ssize_t send_cb(nghttp2_session *s, const uint8_t *d, size_t n, int f, void *u) {
    (void)s; (void)d; (void)f; (void)u;
    return (ssize_t)n;
}

static long hpack(void) {
    nghttp2_hd_deflater *def;
    nghttp2_hd_inflater *inf;
    long r = 0;
    if (nghttp2_hd_deflate_new(&def, 4096) != 0) return -1;
    nghttp2_hd_inflate_new(&inf);
    nghttp2_nv nv[] = {
        {(uint8_t *)":method", (uint8_t *)"GET", 7, 3, 0},
        {(uint8_t *)":path", (uint8_t *)"/index.html", 5, 11, 0},
        {(uint8_t *)"user-agent", (uint8_t *)"bench/1.0", 10, 9, 0},
    };
    uint8_t buf[256];
    ssize_t n = nghttp2_hd_deflate_hd(def, buf, sizeof buf, nv, 3);
    if (n > 0) {
        uint8_t *in = buf;
        size_t left = (size_t)n;
        for (;;) {
            nghttp2_nv out;
            int flags = 0;
            ssize_t k = nghttp2_hd_inflate_hd2(inf, &out, &flags, in, left, 1);
            if (k < 0) break;
            in += k; left -= (size_t)k;
            if (flags & NGHTTP2_HD_INFLATE_EMIT) r += (long)out.valuelen;
            if (flags & NGHTTP2_HD_INFLATE_FINAL) { nghttp2_hd_inflate_end_headers(inf); break; }
            if (k == 0 && left == 0) break;
        }
    }
    nghttp2_hd_inflate_del(inf);
    nghttp2_hd_deflate_del(def);
    return r;
}

long work(unsigned long i) {
    nghttp2_session_callbacks *cb;
    nghttp2_session *s;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_send_callback(cb, send_cb);
    nghttp2_session_server_new(&s, cb, NULL);
    nghttp2_submit_settings(s, NGHTTP2_FLAG_NONE, NULL, 0);
    static const uint8_t preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /* SETTINGS (empty); HEADERS stream 1 without END_HEADERS, block ":method: GET" (0x82);
     * CONTINUATION with END_HEADERS: ":path: /" (0x84), ":scheme: http" (0x86); RST_STREAM. */
    static const uint8_t frames[] = {
        0, 0, 0, 0x04, 0x00, 0, 0, 0, 0,
        0, 0, 1, 0x01, 0x01, 0, 0, 0, 1, 0x82,
        0, 0, 2, 0x09, 0x04, 0, 0, 0, 1, 0x84, 0x86,
        0, 0, 4, 0x03, 0x00, 0, 0, 0, 1, 0, 0, 0, 8,
    };
    long r = nghttp2_session_mem_recv(s, preface, sizeof preface - 1);
    r += nghttp2_session_mem_recv(s, frames, sizeof frames);
    nghttp2_session_send(s);
    nghttp2_session_del(s);
    nghttp2_session_callbacks_del(cb);
    return r + ((i & 7) == 0 ? hpack() : 0);
}
