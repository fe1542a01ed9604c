/* An unrelated process with a big binary (a 200 MB initialised array): what a host scan for
   another module's build-id must not read whole. */
#include <unistd.h>
char big[200 << 20] = { 1 };
int main(void) { for (;;) { if (big[12345] == 7) return 1; pause(); } }
