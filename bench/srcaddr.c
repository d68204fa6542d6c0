/* A source address for each simulated etcd host of bench/fleet.py (LD_PRELOAD in its workers).
 *
 * gRPC cannot bind a client socket to a source address, so the etcd hosts of the fleet bench all
 * came from 127.0.0.1. With this library preloaded, a connect() to 127.20.Y.Z (the fleet's) on a
 * port listed in DISCOVERY_SRCADDR_PORTS (comma-separated: the members', or the proxy's) binds
 * the socket to 127.20.Y.Z and connects it to 127.0.0.1 on that port instead. A host whose
 * registry URL names its own address (etcd://127.20.0.7:2379,...) so reaches the members from
 * that address, as a ZooKeeper host does through kazoo's socket (bench/fleet_host.py). gRPC's
 * IPv4-mapped IPv6 sockets (::ffff:127.20.Y.Z) are rewritten the same way. Every other connect()
 * is passed on untouched. Built by the bench at its start (fleet_procs.source_addresses). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define LOOPBACK 0x7f000001u
#define FLEET 0x7f14u /* 127.20.0.0/16: bench/fleet_host.py's source_ip */
#define MAX_PORTS 64

static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static uint16_t ports[MAX_PORTS];
static int nports;

__attribute__((constructor)) static void load(void) {
    real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    const char *s = getenv("DISCOVERY_SRCADDR_PORTS");
    while (s && *s && nports < MAX_PORTS) {
        char *end;
        long p = strtol(s, &end, 10);
        if (end == s) break;
        if (p > 0 && p < 65536) ports[nports++] = (uint16_t)p;
        s = *end ? end + 1 : end;
    }
}

static int listed(uint16_t port) {
    for (int i = 0; i < nports; i++)
        if (ports[i] == port) return 1;
    return 0;
}

/* The IPv4 address (host order) a destination stands for, or 0 if it is not rewritten. */
static uint32_t own_address(const struct sockaddr *addr, socklen_t len, uint16_t *port) {
    uint32_t ip = 0;
    if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        ip = ntohl(in->sin_addr.s_addr);
        *port = ntohs(in->sin_port);
    } else if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
        if (!IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) return 0;
        memcpy(&ip, &in6->sin6_addr.s6_addr[12], 4);
        ip = ntohl(ip);
        *port = ntohs(in6->sin6_port);
    }
    return (ip >> 16) == FLEET && listed(*port) ? ip : 0;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    uint16_t port = 0;
    uint32_t ip = addr ? own_address(addr, len, &port) : 0;
    if (!real_connect) {
        errno = ENOSYS;
        return -1;
    }
    if (!ip) return real_connect(fd, addr, len);
    if (addr->sa_family == AF_INET) {
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(ip)};
        if (bind(fd, (const struct sockaddr *)&src, sizeof src) != 0 && errno != EINVAL)
            return -1;
        struct sockaddr_in dst = *(const struct sockaddr_in *)addr;
        dst.sin_addr.s_addr = htonl(LOOPBACK);
        return real_connect(fd, (const struct sockaddr *)&dst, sizeof dst);
    }
    struct sockaddr_in6 src = {.sin6_family = AF_INET6};
    struct sockaddr_in6 dst = *(const struct sockaddr_in6 *)addr;
    uint32_t src_ip = htonl(ip), dst_ip = htonl(LOOPBACK);
    src.sin6_addr.s6_addr[10] = src.sin6_addr.s6_addr[11] = 0xff;
    memcpy(&src.sin6_addr.s6_addr[12], &src_ip, 4);
    memcpy(&dst.sin6_addr.s6_addr[12], &dst_ip, 4);
    if (bind(fd, (const struct sockaddr *)&src, sizeof src) != 0 && errno != EINVAL) return -1;
    return real_connect(fd, (const struct sockaddr *)&dst, sizeof dst);
}
