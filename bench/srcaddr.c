/* A source address for each simulated etcd host of the benches (LD_PRELOAD in bench/fleet.py's
 * workers; the auth benches preload it in themselves: fleet_procs.preload_source_addresses).
 *
 * gRPC cannot bind a client socket to a source address, so the etcd hosts of the fleet bench all
 * came from 127.0.0.1. With this library preloaded, a connect() to 127.20.Y.Z (the fleet's) on a
 * port listed in DISCOVERY_SRCADDR_PORTS (comma-separated: the members', or the proxy's) binds
 * the socket to 127.20.Y.Z and connects it to 127.0.0.1 on that port instead. A host whose
 * registry URL names its own address (etcd://127.20.0.7:2379,...) so reaches the members from
 * that address, as a ZooKeeper host does through kazoo's socket (bench/fleet_host.py). gRPC's
 * IPv4-mapped IPv6 sockets (::ffff:127.20.Y.Z) are rewritten the same way. Every other connect()
 * is passed on untouched. Built by the bench at its start (fleet_procs.build_srcaddr). */
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

static int (*real_connect)(int, const struct sockaddr *, socklen_t);

__attribute__((constructor)) static void load(void) {
    real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
}

/* Whether DISCOVERY_SRCADDR_PORTS lists ``port``: read at each connect to a fleet address, as a
 * bench whose hosts are its own threads (the auth benches) sets it once its members are started */
static int listed(uint16_t port) {
    const char *s = getenv("DISCOVERY_SRCADDR_PORTS");
    while (s && *s) {
        char *end;
        long p = strtol(s, &end, 10);
        if (end == s) return 0;
        if (p == port) return 1;
        s = *end ? end + 1 : end;
    }
    return 0;
}

/* Where the IPv4 address of ``sa`` is: an IPv4 one's, or an IPv4-mapped IPv6 one's last 4 bytes
 * (NULL: neither). Read for the destination, written for the source and the new destination. */
static unsigned char *ipv4_in(struct sockaddr_storage *sa) {
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)sa;
    if (sa->ss_family == AF_INET) return (unsigned char *)&((struct sockaddr_in *)sa)->sin_addr;
    if (sa->ss_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr))
        return &in6->sin6_addr.s6_addr[12];
    return NULL;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    if (!real_connect) {
        errno = ENOSYS;
        return -1;
    }
    struct sockaddr_storage dst, src = {.ss_family = AF_INET6};
    socklen_t whole = addr && addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                          : sizeof(struct sockaddr_in);
    if (!addr || len < whole || len > sizeof dst) return real_connect(fd, addr, len);
    memcpy(&dst, addr, len);
    unsigned char *at = ipv4_in(&dst);
    uint32_t ip = 0, loopback = htonl(LOOPBACK);
    if (at) memcpy(&ip, at, 4);
    /* (sin_port and sin6_port are at the same place) */
    if ((ntohl(ip) >> 16) != FLEET || !listed(ntohs(((struct sockaddr_in *)&dst)->sin_port)))
        return real_connect(fd, addr, len);
    /* the source: ::ffff:0.0.0.0 (past an IPv4 address's end: unused there), then the family */
    ((struct sockaddr_in6 *)&src)->sin6_addr.s6_addr[10] = 0xff;
    ((struct sockaddr_in6 *)&src)->sin6_addr.s6_addr[11] = 0xff;
    src.ss_family = dst.ss_family;
    memcpy(ipv4_in(&src), at, 4);  /* from the host's own address, any port */
    memcpy(at, &loopback, 4);  /* to 127.0.0.1 */
    if (bind(fd, (struct sockaddr *)&src, len) != 0 && errno != EINVAL) return -1;
    return real_connect(fd, (struct sockaddr *)&dst, len);
}
