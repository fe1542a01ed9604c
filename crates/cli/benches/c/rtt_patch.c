/* The fix of rtt_server.c's handle(). */
long handle(long x) { return x * 7 + 2; }
