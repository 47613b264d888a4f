/* The service's own library (libhelper.so), and the preload the policy may grant (good.so). */
int helper(void) { return 0; }
