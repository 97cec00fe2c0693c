/*
 * flaskapp: a tiny HTTP/1.0 server standing in for the seed's Python Flask app
 * (hostname + a visit counter kept in redis). Built static by
 * scripts/test-node.sh into the image mesh-test-node/flaskapp (see docs/node.md).
 *
 * Every request on $PORT (default 5000) gets one line:
 *   host=<hostname> version=<$VERSION> client=<ip>:<port> visits=<N>
 * N is redis' reply to `INCR hits`, sent on each request to
 * $REDIS_HOST:$REDIS_PORT, else $REDIS_SERVICE_HOST:$REDIS_SERVICE_PORT (the
 * variables Kubernetes sets for a Service `redis`; the host must be a numeric
 * IPv4 or IPv6 address, port default 6379), with a 1 s timeout. No redis
 * configured: visits=none; configured but unreachable, timed out or a reply
 * that is not an integer: visits=error. The request never fails for redis.
 *
 * One process per connection. On SIGTERM it keeps serving for $DRAIN_SECONDS
 * (default 2, 0: exit at once), then exits (it is PID 1): the time every
 * load balancer, kube-proxy or a mesh, takes to stop sending new connections
 * to a terminating pod; a rolling restart then fails no request.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static unsigned drain_seconds = 2;

static void on_alarm(int sig) { (void)sig; _exit(0); }

static void on_term(int sig) {
    (void)sig;
    if (drain_seconds == 0) _exit(0);
    alarm(drain_seconds);
}

static const char *env(const char *name) {
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

static int all_digits(const char *s) {
    if (!s || !*s) return 0;
    for (; *s; s++)
        if (!isdigit((unsigned char)*s)) return 0;
    return 1;
}

/* Writes "none", "error" or the counter into out. */
static void visits(char *out, size_t len) {
    const char *host = env("REDIS_HOST");
    if (!host) host = env("REDIS_SERVICE_HOST");
    if (!host) {
        snprintf(out, len, "none");
        return;
    }
    /* REDIS_PORT may also be Kubernetes' docker-link variable of a Service
     * `redis` ("tcp://10.96.0.5:6379"): only a plain number overrides. */
    const char *port = env("REDIS_PORT");
    if (!all_digits(port)) port = env("REDIS_SERVICE_PORT");
    int p = all_digits(port) ? atoi(port) : 6379;
    snprintf(out, len, "error");
    if (p <= 0 || p > 65535) return;

    struct sockaddr_storage ss;
    socklen_t sl;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((unsigned short)p);
        sl = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((unsigned short)p);
        sl = sizeof *a6;
    } else {
        return;
    }
    int s = socket(ss.ss_family, SOCK_STREAM, 0);
    if (s < 0) return;
    /* Linux applies SO_SNDTIMEO to connect() too. */
    struct timeval tv = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    static const char cmd[] = "*2\r\n$4\r\nINCR\r\n$4\r\nhits\r\n";
    char r[64];
    size_t got = 0;
    if (connect(s, (struct sockaddr *)&ss, sl) == 0 && write(s, cmd, sizeof cmd - 1) == (ssize_t)(sizeof cmd - 1)) {
        while (got < sizeof r - 1) {
            ssize_t n = read(s, r + got, sizeof r - 1 - got);
            if (n <= 0) break;
            got += (size_t)n;
            r[got] = 0;
            if (strstr(r, "\r\n")) break;
        }
    }
    close(s);
    r[got] = 0;
    char *end = strstr(r, "\r\n");
    if (got < 4 || r[0] != ':' || !end) return;
    *end = 0;
    char *q = r + 1;
    if (*q == '-') q++;
    if (!all_digits(q)) return;
    snprintf(out, len, "%s", r + 1);
}

static void serve(int c, const struct sockaddr_in *peer) {
    char req[4096], host[256] = "unknown", body[640], head[256], v[64];
    size_t got = 0;
    struct timeval tv = {5, 0};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    while (got < sizeof req - 1) {
        ssize_t n = read(c, req + got, sizeof req - 1 - got);
        if (n <= 0) break;
        got += (size_t)n;
        req[got] = 0;
        if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n")) break;
    }
    gethostname(host, sizeof host - 1);
    const char *ver = getenv("VERSION");
    char ip[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &peer->sin_addr, ip, sizeof ip);
    visits(v, sizeof v);
    int bl = snprintf(body, sizeof body, "host=%s version=%s client=%s:%u visits=%s\n", host,
                      ver ? ver : "unknown", ip, ntohs(peer->sin_port), v);
    if (bl < 0) return;
    if ((size_t)bl >= sizeof body) bl = (int)sizeof body - 1;
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                      "Connection: close\r\n\r\n", bl);
    if (write(c, head, (size_t)hl) < 0 || write(c, body, (size_t)bl) < 0) { /* peer gone */ }
    shutdown(c, SHUT_WR);
}

int main(void) {
    const char *drain = getenv("DRAIN_SECONDS");
    if (drain) drain_seconds = (unsigned)atoi(drain);
    signal(SIGALRM, on_alarm);
    signal(SIGTERM, on_term);
    signal(SIGINT, on_alarm);
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    const char *p = getenv("PORT");
    int port = p ? atoi(p) : 5000;
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1024) < 0) {
        perror("flaskapp: listen");
        return 1;
    }
    fprintf(stderr, "flaskapp: listening on 0.0.0.0:%d\n", port);
    for (;;) {
        struct sockaddr_in peer;
        socklen_t pl = sizeof peer;
        int c = accept(s, (struct sockaddr *)&peer, &pl);
        if (c < 0) continue;
        pid_t pid = fork();
        if (pid == 0) {
            signal(SIGTERM, SIG_DFL);
            alarm(0);
            close(s);
            serve(c, &peer);
            close(c);
            _exit(0);
        }
        close(c);
    }
}
