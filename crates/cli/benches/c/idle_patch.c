int handle(int x) { return x * 5 + 4; }
