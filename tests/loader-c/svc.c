/* The attested service of the loader tests (tests/tests/adversarial/loader.rs): a small
 * dynamically linked program that connects to 127.0.0.1:PORT (argv[1]).
 * Exit: 0 connected, 13 EPERM (the enforcer denied it), 1 anything else. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int helper(void); /* from libhelper.so, found through RUNPATH $ORIGIN/lib */

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        return 1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(argv[1]));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0)
        return errno == EPERM ? 13 : 1;
    close(s);
    return helper();
}
