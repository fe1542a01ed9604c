/* Shared library for the "function inside a .so" test. */
int counter_in_lib;
static int lib_factor = 3;
static __attribute__((noinline)) int helper(int x) { return x * lib_factor; }
__attribute__((noinline)) int compute(int x) {
    counter_in_lib++;
    return helper(x) + 1;
}
void set_lib_factor(int f) { lib_factor = f; }
