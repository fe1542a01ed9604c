__attribute__((noinline)) int hot(int x) { return x * 3 + 2; }
#define F(n) int f##n(int x) { return x * (n + 3) + n + 2000; }
F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9)
F(10) F(11) F(12) F(13) F(14) F(15) F(16) F(17) F(18) F(19)
