/* cJSON: parse, build, print, set strings, insert into arrays. */
#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

long work(unsigned long i) {
    long r = 0;
    const char *text = (i & 1) ? "{\"a\":[1,2.5,-3e2,\"x\"],\"b\":{\"c\":null,\"d\":true},\"e\":\"str\"}"
                               : "[1.0000000000000002, 123456789012345678901234567890, \"\\u00e9\"]";
    cJSON *j = cJSON_Parse(text);
    if (j) {
        char *p = cJSON_PrintUnformatted(j);
        if (p) { r += (long)strlen(p); free(p); }
        cJSON_Delete(j);
    }
    cJSON *o = cJSON_CreateObject();
    cJSON *s = cJSON_AddStringToObject(o, "name", "value");
    cJSON_SetValuestring(s, (i & 2) ? "longer value than before" : "v");
    cJSON *a = cJSON_AddArrayToObject(o, "list");
    for (int k = 0; k < 4; k++)
        cJSON_InsertItemInArray(a, 0, cJSON_CreateNumber(k * 1.5));
    cJSON_ReplaceItemInObject(o, "name", cJSON_CreateString("replaced"));
    char buf[256];
    if (cJSON_PrintPreallocated(o, buf, sizeof buf, 1)) r += (long)strlen(buf);
    cJSON_Delete(o);
    return r;
}
