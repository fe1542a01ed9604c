/* Level 1: compute() answers helper(x) + 100 and still counts calls in the running counter.
 * `helper` is an unchanged function of the target (static binding when it is local). */
#include <string.h>
extern int COUNTER;
int helper(int x);

/* A new static helper and a new string literal; noipa keeps gcc from folding them away. */
__attribute__((noipa)) static int offset(const char *s) { return (int)strlen(s) * 10; }

int compute(int x) {
    COUNTER++;
    return helper(x) + offset("0123456789");
}
