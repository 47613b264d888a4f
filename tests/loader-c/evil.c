/* The attacker's object of the loader tests: its constructor connects to 127.0.0.1:EVIL_PORT
 * (from the environment) before the program's main, then _exit()s with a code that says what
 * happened: 42 connected, 43 EPERM (denied), 44 anything else. Built as evil.so (LD_PRELOAD,
 * LD_AUDIT: la_version) and as a rogue libhelper.so (LD_LIBRARY_PATH). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

extern char **environ;

/* EVIL_REWRITE set: hide LD_PRELOAD from /proc/PID/environ (rename it in place), then try
 * for 3 s: a process continued before the agent read its environment must not gain the
 * identity from the rewrite. */
static int rewrite_and_retry(const char *port) {
    for (char **e = environ; *e; e++)
        if (!strncmp(*e, "LD_PRELOAD=", 11))
            (*e)[0] = 'X';
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < 300; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0)
            return 44;
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0)
            return 42;
        if (errno != EPERM)
            return 44;
        close(s);
        usleep(10000);
    }
    return 43;
}

__attribute__((constructor)) static void evil(void) {
    const char *port = getenv("EVIL_PORT");
    if (!port)
        return;
    if (getenv("EVIL_REWRITE"))
        _exit(rewrite_and_retry(port));
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
