/* libcurl: file:// transfers with cookies and HSTS, the URL API, escaping, dates. */
#include <curl/curl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static size_t sink(char *p, size_t s, size_t n, void *u) {
    (void)p;
    *(long *)u += (long)(s * n);
    return s * n;
}

long work(unsigned long i) {
    static int init;
    long r = 0;
    if (!init) {
        curl_global_init(CURL_GLOBAL_DEFAULT);
        FILE *f = fopen("page.txt", "w");
        if (f) { fputs("hello from a file\n", f); fclose(f); }
        init = 1;
    }
    CURLU *u = curl_url();
    curl_url_set(u, CURLUPART_URL, (i & 1) ? "https://user:pw@example.com:8443/a/../b/./c?q=1#frag"
                                           : "ftp://ftp.example.org/%2e%2e/file;type=i", 0);
    char *s = NULL;
    if (curl_url_get(u, CURLUPART_URL, &s, 0) == CURLUE_OK) { r += (long)strlen(s); curl_free(s); }
    curl_url_cleanup(u);
    if ((i & 15) != 0) return r;
    CURL *c = curl_easy_init();
    if (!c) return -1;
    char cwd[512], url[600];
    if (!getcwd(cwd, sizeof cwd)) return -2;
    snprintf(url, sizeof url, "file://%s/page.txt", cwd);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &r);
    curl_easy_setopt(c, CURLOPT_COOKIEFILE, "");
    curl_easy_setopt(c, CURLOPT_COOKIELIST, "Set-Cookie: a=b; domain=example.com; path=/");
    curl_easy_setopt(c, CURLOPT_HSTS_CTRL, (long)CURLHSTS_ENABLE);
    r += curl_easy_perform(c);
    struct curl_slist *cookies = NULL;
    curl_easy_getinfo(c, CURLINFO_COOKIELIST, &cookies);
    for (struct curl_slist *p = cookies; p; p = p->next) r += (long)strlen(p->data);
    curl_slist_free_all(cookies);
    char *e = curl_easy_escape(c, "a b&c/d", 0);
    if (e) { r += (long)strlen(e); curl_free(e); }
    curl_easy_cleanup(c);
    r += (long)(curl_getdate("Sun, 06 Nov 1994 08:49:37 GMT", NULL) & 0xff);
    return r;
}
