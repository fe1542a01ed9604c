int blocker(int n) { return n + 1; }
