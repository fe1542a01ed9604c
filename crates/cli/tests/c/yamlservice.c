/* A long-running service using libyaml: "version" answers yaml_get_version_string(), "parse"
 * parses a small document and answers how many events it produced. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <yaml.h>

static int count_events(const char *doc) {
    yaml_parser_t parser;
    yaml_event_t event;
    int n = 0, done = 0;
    if (!yaml_parser_initialize(&parser)) return -1;
    yaml_parser_set_input_string(&parser, (const unsigned char *)doc, strlen(doc));
    while (!done) {
        if (!yaml_parser_parse(&parser, &event)) { n = -1; break; }
        done = event.type == YAML_STREAM_END_EVENT;
        yaml_event_delete(&event);
        n++;
    }
    yaml_parser_delete(&parser);
    return n;
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (strcmp(line, "version") == 0) printf("%s\n", yaml_get_version_string());
        else if (strcmp(line, "parse") == 0) printf("%d\n", count_events("a: [1, 2]\nb: x\n"));
        else printf("?\n");
    }
    return 0;
}
