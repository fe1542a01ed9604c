/* A fix that crashes its process on one input ("compute 13"): the agent's health guard must
 * roll it back. Otherwise compute() answers helper(x) + 300. */
extern int COUNTER;
int helper(int x);

int compute(int x) {
    COUNTER++;
    if (x == 13) {
        volatile int *volatile p = 0; /* volatile: gcc keeps the store and cannot see the null */
        *p = x;
    }
    return helper(x) + 300;
}
