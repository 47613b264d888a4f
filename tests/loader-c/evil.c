/* The attacker's object of the loader tests: its constructor connects to 127.0.0.1:EVIL_PORT
 * (from the environment) before the program's main, then _exit()s with a code that says what
 * happened: 42 connected, 43 EPERM (denied), 44 anything else. Built as evil.so (LD_PRELOAD,
 * LD_AUDIT: la_version) and as a rogue libhelper.so (LD_LIBRARY_PATH). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

__attribute__((constructor)) static void evil(void) {
    const char *port = getenv("EVIL_PORT");
    if (!port)
        return;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        _exit(44);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0)
        _exit(errno == EPERM ? 43 : 44);
    _exit(42);
}

unsigned int la_version(unsigned int v) { return v; }

int helper(void) { return 0; }
