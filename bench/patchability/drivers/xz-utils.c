/* liblzma: single- and multi-threaded .xz encode/decode, and an index. */
#include <lzma.h>
#include <string.h>

long work(unsigned long i) {
    static uint8_t in[65536], out[70000], back[65536];
    for (size_t k = 0; k < sizeof in; k++) in[k] = (uint8_t)((k * 7 + i) % 251 / 13);
    size_t n = 0;
    if (lzma_easy_buffer_encode(1, LZMA_CHECK_CRC64, NULL, in, sizeof in, out, &n, sizeof out) != LZMA_OK)
        return -1;
    long r = (long)n;
    lzma_stream s = LZMA_STREAM_INIT;
    lzma_mt mt;
    memset(&mt, 0, sizeof mt);
    mt.threads = 2;
    mt.memlimit_threading = 1 << 26;
    mt.memlimit_stop = 1 << 28;
    mt.flags = 0;
    if (lzma_stream_decoder_mt(&s, &mt) == LZMA_OK) {
        s.next_in = out; s.avail_in = n;
        s.next_out = back; s.avail_out = sizeof back;
        lzma_ret ret = lzma_code(&s, LZMA_FINISH);
        r += (ret == LZMA_STREAM_END) + (long)s.total_out;
        lzma_end(&s);
    }
    lzma_index *idx = lzma_index_init(NULL);
    for (int k = 0; k < 8; k++) lzma_index_append(idx, NULL, 100 + k, 1000);
    r += (long)lzma_index_block_count(idx);
    lzma_index_end(idx, NULL);
    return r;
}
