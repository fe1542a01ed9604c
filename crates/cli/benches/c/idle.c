/* A minimal long-running process for the fleet benchmark. */
#include <unistd.h>
__attribute__((noinline)) int handle(int x) { return x * 5 + 3; }
int main(void) { for (;;) pause(); }
