/*
 * A product embedding Prism through its C ABI, as the e2e suite runs it: it opens a TUN itself
 * (as an Android app gets one from VpnService), sets it up, starts Prism on the descriptor with
 * a protect callback that marks every socket Prism opens, fetches through it, and stops it.
 *
 *   prism-fetch TUN SETUP CONFIG ECHO_IP ECHO_PORT PING_TARGET MARK|none
 *
 * SETUP is a shell command run once the TUN exists (addresses, link up, routes). MARK is the
 * SO_MARK the protect callback puts on each socket, or "none" for no callback. It prints one
 * line per result and exits 0 when Prism started and stopped, whatever the fetches did; the
 * suite reads the lines.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "prism.h"

static atomic_int protected_sockets;

/* The protect callback: mark the socket so a policy rule routes it outside the TUN. */
static int protect(void *context, int fd) {
    unsigned int mark = *(unsigned int *)context;
    if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof mark) != 0) {
        return errno;
    }
    atomic_fetch_add(&protected_sockets, 1);
    return 0;
}

static int open_tun(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("open /dev/net/tun");
        return -1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) != 0) {
        perror("TUNSETIFF");
        close(fd);
        return -1;
    }
    return fd;
}

/* Sends a line to the echo server through Prism and checks it comes back. */
static int echo(const char *ip, int port) {
    const char message[] = "hello from a C program, through Prism\n";
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) {
        return errno;
    }
    struct timeval timeout = {.tv_sec = 5};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &to.sin_addr);
    int error = 0;
    char back[sizeof message];
    size_t got = 0;
    if (connect(s, (struct sockaddr *)&to, sizeof to) != 0) {
        error = errno;
    } else if (write(s, message, sizeof message - 1) != (ssize_t)(sizeof message - 1)) {
        error = errno ? errno : EIO;
    } else {
        while (got < sizeof message - 1) {
            ssize_t n = read(s, back + got, sizeof message - 1 - got);
            if (n <= 0) {
                error = n == 0 ? ECONNRESET : errno;
                break;
            }
            got += (size_t)n;
        }
        if (!error && memcmp(back, message, sizeof message - 1) != 0) {
            error = EBADMSG;
        }
    }
    close(s);
    return error;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s TUN SETUP CONFIG ECHO_IP ECHO_PORT PING_TARGET MARK|none\n", argv[0]);
        return 2;
    }
    int tun = open_tun(argv[1]);
    if (tun < 0) {
        return 1;
    }
    if (system(argv[2]) != 0) {
        fprintf(stderr, "setup failed: %s\n", argv[2]);
        return 1;
    }
    unsigned int mark = 0;
    PrismProtect callback = NULL;
    if (strcmp(argv[7], "none") != 0) {
        mark = (unsigned int)strtoul(argv[7], NULL, 0);
        callback = protect;
    }
    PrismEngine *engine = prism_start(argv[3], tun, callback, &mark);
    if (engine == NULL) {
        fprintf(stderr, "prism_start: %s\n", prism_last_error());
        return 1;
    }
    printf("started\n");

    int error = echo(argv[4], atoi(argv[5]));
    if (error == 0) {
        printf("echo: ok\n");
    } else {
        printf("echo: failed (%s)\n", strerror(error));
    }
    char ping[256];
    snprintf(ping, sizeof ping, "ping -c 2 -i 0.2 -W 2 %s > /dev/null 2>&1", argv[6]);
    printf("ping: %s\n", system(ping) == 0 ? "ok" : "failed");

    char *stats = prism_stats(engine);
    printf("stats: %s\n", stats ? stats : "NULL");
    prism_string_free(stats);
    char *failure = prism_failure(engine);
    printf("failure: %s\n", failure ? failure : "none");
    prism_string_free(failure);
    char *last = prism_stop(engine, 1000);
    if (last == NULL) {
        fprintf(stderr, "prism_stop: %s\n", prism_last_error());
        return 1;
    }
    printf("final: %s\n", last);
    prism_string_free(last);
    printf("protected: %d\n", atomic_load(&protected_sockets));
    printf("stopped\n");
    return 0;
}
