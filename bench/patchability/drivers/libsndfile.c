/* libsndfile: write and read WAV, AU and AIFF files through virtual I/O in memory. */
#include <sndfile.h>
#include <string.h>

static unsigned char mem[1 << 16];
static sf_count_t len, pos;
static sf_count_t vlen(void *u) { (void)u; return len; }
static sf_count_t vseek(sf_count_t off, int whence, void *u) {
    (void)u;
    pos = whence == SEEK_SET ? off : whence == SEEK_CUR ? pos + off : len + off;
    return pos;
}
static sf_count_t vread(void *p, sf_count_t n, void *u) {
    (void)u;
    if (pos + n > len) n = len - pos;
    memcpy(p, mem + pos, (size_t)n); pos += n; return n;
}
static sf_count_t vwrite(const void *p, sf_count_t n, void *u) {
    (void)u;
    if (pos + n > (sf_count_t)sizeof mem) n = (sf_count_t)sizeof mem - pos;
    memcpy(mem + pos, p, (size_t)n); pos += n; if (pos > len) len = pos; return n;
}
static sf_count_t vtell(void *u) { (void)u; return pos; }

long work(unsigned long i) {
    static const int formats[] = {SF_FORMAT_WAV | SF_FORMAT_PCM_16, SF_FORMAT_AU | SF_FORMAT_FLOAT,
                                  SF_FORMAT_AIFF | SF_FORMAT_PCM_24, SF_FORMAT_WAV | SF_FORMAT_IMA_ADPCM};
    SF_VIRTUAL_IO io = {vlen, vseek, vread, vwrite, vtell};
    SF_INFO info = {0};
    info.samplerate = 8000; info.channels = 1; info.format = formats[i % 4];
    len = pos = 0;
    short samples[1000];
    for (int k = 0; k < 1000; k++) samples[k] = (short)(k * 37);
    SNDFILE *f = sf_open_virtual(&io, SFM_WRITE, &info, NULL);
    if (!f) return -1;
    sf_write_short(f, samples, 1000);
    sf_close(f);
    pos = 0;
    memset(&info, 0, sizeof info);
    f = sf_open_virtual(&io, SFM_READ, &info, NULL);
    if (!f) return -2;
    double d[1000];
    long r = (long)sf_read_double(f, d, 1000);
    sf_close(f);
    return r + (long)len;
}
