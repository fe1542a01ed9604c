/* yajl: the tree parser (lexer, parser, buffer) and the generator. */
#include <yajl/yajl_tree.h>
#include <yajl/yajl_gen.h>
#include <string.h>

long work(unsigned long i) {
    long r = 0;
    char err[128];
    const char *text = (i & 1) ? "{\"a\": [1, 2.5, -3e2, \"x\\u00e9\"], \"b\": {\"c\": null, \"d\": true}}"
                               : "[\"long string with escapes \\n\\t\\\"\", 12345678901234567890, {}]";
    yajl_val v = yajl_tree_parse(text, err, sizeof err);
    if (v) { r += YAJL_IS_OBJECT(v) ? 1 : 2; yajl_tree_free(v); }
    yajl_gen g = yajl_gen_alloc(NULL);
    yajl_gen_config(g, yajl_gen_beautify, 1);
    yajl_gen_map_open(g);
    yajl_gen_string(g, (const unsigned char *)"key", 3);
    yajl_gen_array_open(g);
    for (int k = 0; k < 8; k++) yajl_gen_integer(g, k * (long)i);
    yajl_gen_string(g, (const unsigned char *)"\xc3\xa9\n", 3);
    yajl_gen_array_close(g);
    yajl_gen_map_close(g);
    const unsigned char *out; size_t len;
    if (yajl_gen_get_buf(g, &out, &len) == yajl_gen_status_ok) r += (long)len;
    yajl_gen_free(g);
    return r;
}
