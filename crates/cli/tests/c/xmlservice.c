/* A long-running service using expat. "negative" hands XML_ParseBuffer a negative length, the
 * trigger of CVE-2024-45490 (fixed upstream by rejecting it with XML_ERROR_INVALID_ARGUMENT);
 * "parse" parses a small document and counts its elements; "served" answers how many requests
 * this process has served (state that must survive the patch). */
#include <expat.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static unsigned long served;

static void XMLCALL on_start(void *count, const XML_Char *name, const XML_Char **attrs) {
    (void)name;
    (void)attrs;
    ++*(int *)count;
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        served++;
        if (strcmp(line, "negative") == 0) {
            XML_Parser p = XML_ParserCreate(NULL);
            void *buf = XML_GetBuffer(p, 16);
            memcpy(buf, "<a>", 3);
            int st = XML_ParseBuffer(p, -1, 0);
            printf("status %d error %d\n", st, (int)XML_GetErrorCode(p));
            XML_ParserFree(p);
        } else if (strcmp(line, "parse") == 0) {
            int count = 0;
            XML_Parser p = XML_ParserCreate(NULL);
            XML_SetUserData(p, &count);
            XML_SetStartElementHandler(p, on_start);
            const char *doc = "<r><a/><b><c/></b></r>";
            int st = XML_Parse(p, doc, (int)strlen(doc), 1);
            printf("status %d elements %d\n", st, count);
            XML_ParserFree(p);
        } else if (strcmp(line, "served") == 0) {
            printf("%lu\n", served);
        } else {
            printf("?\n");
        }
    }
    return 0;
}
