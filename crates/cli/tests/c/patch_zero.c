int zero(void) { return 1; }
