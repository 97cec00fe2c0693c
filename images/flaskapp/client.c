/*
 * client: a tiny static HTTP client shipped in the flaskapp image as /client,
 * for tests run from inside a pod (the image has no shell). See docs/node.md.
 *
 *   client HOST PORT N
 *       N connections one after another, each `GET /`, one line per
 *       connection: the response body (flaskapp's `host=... version=...`) or
 *       `error <what>`. Exit 1 if any failed.
 *
 *   client --storm SECONDS [--threads T] [--out FILE] [--daemon] HOST PORT
 *       T threads (default 1), each connect + `GET /` in a loop until SECONDS
 *       have passed or, with SECONDS 0, until /tmp/stop exists (checked
 *       between requests; removed when the storm starts). Then a summary:
 *         ok=<n> failed=<n>
 *         error <what> <count>      one per distinct failure reason
 *         host <hostname> <count>   one per answering host (the body's host=)
 *       on stdout, or with --out written to FILE atomically (FILE.tmp, then
 *       rename). --daemon (needs --out): fork, the parent exits 0 at once and
 *       the child runs the storm. Exit 0 if failed=0, else 1.
 *
 *   client --stop-storm FILE
 *       Touch /tmp/stop, wait up to 30 s for FILE, print it; exit 0 if it
 *       says failed=0, else 1.
 *
 * HOST is a numeric IPv4 address. Connect and read time out after 3 s.
 * /tmp is created (mode 1777) when missing: the image has none.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define STOP_FILE "/tmp/stop"

/* The image is FROM scratch: no /tmp unless we make it. */
static void ensure_tmp(void) {
    if (mkdir("/tmp", 01777) == 0) (void)chmod("/tmp", 01777); /* past the umask */
}

/* One `GET /`: returns 0 and the first line of the body in out, or -1 and
 * the failure reason (without "error ") in out. */
static int get_once(const struct sockaddr_in *a, char *out, size_t len) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) {
        snprintf(out, len, "socket: %s", strerror(errno));
        return -1;
    }
    struct timeval tv = {3, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(s, (const struct sockaddr *)a, sizeof *a) < 0) {
        /* A connect that hit SO_SNDTIMEO fails with EINPROGRESS. */
        if (errno == EINPROGRESS || errno == EAGAIN)
            snprintf(out, len, "connect: timed out after 3 s");
        else
            snprintf(out, len, "connect: %s", strerror(errno));
        close(s);
        return -1;
    }
    static const char req[] = "GET / HTTP/1.0\r\nHost: client\r\n\r\n";
    char resp[4096];
    size_t got = 0;
    ssize_t r = 0;
    if (write(s, req, sizeof req - 1) < 0) {
        snprintf(out, len, "write: %s", strerror(errno));
        close(s);
        return -1;
    }
    while (got < sizeof resp - 1 && (r = read(s, resp + got, sizeof resp - 1 - got)) > 0) got += (size_t)r;
    int rerr = r < 0 ? errno : 0;
    resp[got] = 0;
    close(s);
    char *body = strstr(resp, "\r\n\r\n");
    if (!body) {
        if (rerr == EAGAIN || rerr == EWOULDBLOCK)
            snprintf(out, len, "read: timed out after 3 s");
        else if (rerr)
            snprintf(out, len, "read: %s", strerror(rerr));
        else
            snprintf(out, len, "response: %zu bytes without a body", got);
        return -1;
    }
    body += 4;
    body[strcspn(body, "\r\n")] = 0;
    snprintf(out, len, "%s", body);
    return 0;
}

static int parse_addr(const char *host, const char *port, struct sockaddr_in *a) {
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((unsigned short)atoi(port));
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
        fprintf(stderr, "client: bad IPv4 address %s\n", host);
        return -1;
    }
    return 0;
}

static int sequential(const char *host, const char *port, int n) {
    struct sockaddr_in a;
    if (parse_addr(host, port, &a) < 0) return 2;
    int failed = 0;
    for (int i = 0; i < n; i++) {
        char line[4096];
        if (get_once(&a, line, sizeof line) < 0) {
            printf("error %s\n", line);
            failed++;
        } else {
            printf("%s\n", line);
        }
    }
    return failed ? 1 : 0;
}

/* ---- storm ---------------------------------------------------------------- */

#define MAX_KEYS 256

struct counter {
    char *key;
    unsigned long n;
};

struct tally {
    struct counter c[MAX_KEYS];
    int len;
    unsigned long dropped; /* distinct keys beyond MAX_KEYS */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned long n_ok, n_failed;
static struct tally errors, hosts;
static struct sockaddr_in target;
static int storm_secs;
static struct timespec t_start;

static void count(struct tally *t, const char *key) {
    for (int i = 0; i < t->len; i++) {
        if (strcmp(t->c[i].key, key) == 0) {
            t->c[i].n++;
            return;
        }
    }
    if (t->len == MAX_KEYS) {
        t->dropped++;
        return;
    }
    t->c[t->len].key = strdup(key);
    if (!t->c[t->len].key) {
        t->dropped++;
        return;
    }
    t->c[t->len].n = 1;
    t->len++;
}

static int storm_over(void) {
    if (storm_secs == 0) return access(STOP_FILE, F_OK) == 0;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double el = (double)(now.tv_sec - t_start.tv_sec) + (double)(now.tv_nsec - t_start.tv_nsec) / 1e9;
    return el >= storm_secs;
}

static void *storm_thread(void *arg) {
    (void)arg;
    char line[4096], host[256];
    while (!storm_over()) {
        int r = get_once(&target, line, sizeof line);
        const char *h = NULL;
        if (r == 0) {
            /* "host=<name> ..." */
            char *p = NULL;
            if (strncmp(line, "host=", 5) == 0)
                p = line + 5;
            else if ((p = strstr(line, " host=")))
                p += 6;
            if (p) {
                size_t l = strcspn(p, " ");
                if (l >= sizeof host) l = sizeof host - 1;
                memcpy(host, p, l);
                host[l] = 0;
                h = host;
            }
        }
        pthread_mutex_lock(&mu);
        if (r < 0) {
            n_failed++;
            count(&errors, line);
        } else if (!h || !*h) {
            n_failed++;
            count(&errors, "response: no host= in the body");
        } else {
            n_ok++;
            count(&hosts, h);
        }
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

static void write_summary(FILE *f) {
    fprintf(f, "ok=%lu failed=%lu\n", n_ok, n_failed);
    for (int i = 0; i < errors.len; i++) fprintf(f, "error %s %lu\n", errors.c[i].key, errors.c[i].n);
    if (errors.dropped) fprintf(f, "error (more distinct reasons) %lu\n", errors.dropped);
    for (int i = 0; i < hosts.len; i++) fprintf(f, "host %s %lu\n", hosts.c[i].key, hosts.c[i].n);
    if (hosts.dropped) fprintf(f, "host (more distinct hosts) %lu\n", hosts.dropped);
}

static int storm(int secs, int threads, const char *out) {
    storm_secs = secs;
    clock_gettime(CLOCK_MONOTONIC, &t_start);
    pthread_t *tid = calloc((size_t)threads, sizeof *tid);
    if (!tid) return 2;
    int started = 0;
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&tid[i], NULL, storm_thread, NULL) != 0) {
            pthread_mutex_lock(&mu);
            n_failed++;
            count(&errors, "pthread_create");
            pthread_mutex_unlock(&mu);
            break;
        }
        started++;
    }
    for (int i = 0; i < started; i++) pthread_join(tid[i], NULL);
    free(tid);
    if (!out) {
        write_summary(stdout);
        fflush(stdout);
    } else {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", out);
        FILE *f = fopen(tmp, "w");
        if (!f) {
            fprintf(stderr, "client: %s: %s\n", tmp, strerror(errno));
            return 2;
        }
        write_summary(f);
        if (fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0 || rename(tmp, out) != 0) {
            fprintf(stderr, "client: writing %s: %s\n", out, strerror(errno));
            return 2;
        }
    }
    return n_failed ? 1 : 0;
}

static int stop_storm(const char *file) {
    ensure_tmp();
    int fd = open(STOP_FILE, O_WRONLY | O_CREAT, 0644);
    if (fd < 0) {
        fprintf(stderr, "client: %s: %s\n", STOP_FILE, strerror(errno));
        return 2;
    }
    close(fd);
    for (int i = 0; i < 300 && access(file, F_OK) != 0; i++) usleep(100000);
    FILE *f = fopen(file, "r");
    if (!f) {
        printf("error storm summary %s: %s\n", file, strerror(errno));
        return 1;
    }
    char line[4096];
    int first = 1, ok = 0;
    while (fgets(line, sizeof line, f)) {
        if (first) {
            unsigned long o, fl;
            ok = sscanf(line, "ok=%lu failed=%lu", &o, &fl) == 2 && fl == 0;
            first = 0;
        }
        fputs(line, stdout);
    }
    fclose(f);
    return ok ? 0 : 1;
}

static int usage(void) {
    fprintf(stderr,
            "usage: client HOST PORT N\n"
            "       client --storm SECONDS [--threads T] [--out FILE] [--daemon] HOST PORT\n"
            "       client --stop-storm FILE\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc == 4 && argv[1][0] != '-') return sequential(argv[1], argv[2], atoi(argv[3]));
    if (argc == 3 && strcmp(argv[1], "--stop-storm") == 0) return stop_storm(argv[2]);

    int secs = -1, threads = 1, daemonize = 0;
    const char *out = NULL, *pos[2];
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--storm") == 0 && i + 1 < argc) {
            secs = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
            out = argv[++i];
        } else if (strcmp(argv[i], "--daemon") == 0) {
            daemonize = 1;
        } else if (argv[i][0] != '-' && npos < 2) {
            pos[npos++] = argv[i];
        } else {
            return usage();
        }
    }
    if (secs < 0 || npos != 2 || threads < 1 || threads > 1024 || (daemonize && !out)) return usage();
    if (parse_addr(pos[0], pos[1], &target) < 0) return 2;
    signal(SIGPIPE, SIG_IGN);
    /* Before the parent returns: a --stop-storm after it must not see a stale
     * stop file or summary. */
    ensure_tmp();
    if (unlink(STOP_FILE) < 0 && errno != ENOENT) {
        fprintf(stderr, "client: %s: %s\n", STOP_FILE, strerror(errno));
        return 2;
    }
    if (out) unlink(out);
    if (daemonize) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("client: fork");
            return 2;
        }
        if (pid > 0) return 0;
        setsid();
        int fd = open("/dev/null", O_RDWR);
        if (fd >= 0) {
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
            if (fd > 2) close(fd);
        }
    }
    return storm(secs, threads, out);
}
