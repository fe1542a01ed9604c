/* Level 2: compute() reads the target's static FACTOR directly and answers x * FACTOR + 200;
 * greet() returns a new string literal. */
extern int COUNTER;
extern int FACTOR;
int compute(int x) {
    COUNTER++;
    return x * FACTOR + 200;
}
const char *greet(void) { return "new greeting"; }
