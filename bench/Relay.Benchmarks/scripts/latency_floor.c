// latency_floor: the shortest send-to-receive path a relay can have on this machine, for the paced
// target of docs/PERFORMANCE.md. Two processes on loopback TCP, no TLS, no framing beyond fixed
// 256-byte records, one thread each for the sender, the forwarder and the receiver:
//
//   sender --TCP--> forwarder [write the records read in one wake-up to a file, fdatasync] --TCP--> receiver
//
// The forwarder is a single epoll thread that, in `--fsync DIR` mode, appends every record it read
// in one wake-up to one growing file and fdatasyncs it before forwarding them: the group commit of
// the relay with nothing else around it. Whatever p99 this prints is a floor for any relay that
// acknowledges after fsync and delivers after the write is durable, on the machine it ran on.
//
//   clang -O2 -pthread -o /tmp/latency_floor bench/Relay.Benchmarks/scripts/latency_floor.c
//   /tmp/latency_floor forward 28700 [--fsync /var/tmp/floor] &      # the forwarder
//   /tmp/latency_floor send 28700 5000 8                             # rate/s, seconds; 4+4 connections
//
// With `--logs N` (and --fsync) the forwarder hands each record to one of N logs, chosen by the
// record's queue (the sender spreads records over 100 queues at random, as relay bench does), each
// with a writer thread of its own that appends and fdatasyncs whatever its log has gathered, then
// forwards it: N logs in parallel, a record waiting only for its own log's flush. `--logs 1` is the
// same threads with one log, the fair baseline for N = 2 (a relay store of two logs):
//
//   /tmp/latency_floor forward 28700 --fsync /var/tmp/floor --logs 2 &
//
// The sender paces with clock_nanosleep on absolute deadlines, round-robin over 4 connections;
// each record carries its CLOCK_MONOTONIC send time, and the receiver (4 connections, one epoll
// thread) prints p50 / p99 / p99.9 / max in milliseconds and how many records arrived.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { RECORD = 256, LINKS = 4, MAXCONN = 2 * LINKS };

static void die(const char *what) { perror(what); exit(1); }

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) { if (errno == EINTR || errno == EAGAIN) continue; die("write"); }
        p += w; n -= (size_t)w;
    }
}

static void read_all(int fd, char *p, size_t n) {
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r <= 0) { if (r < 0 && errno == EINTR) continue; die("read"); }
        p += r; n -= (size_t)r;
    }
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// ---- forwarder with N logs, each a writer thread ----
enum { MAXLOGS = 8, PENDING = 1 << 16 };

struct log {
    int fd;
    pthread_mutex_t lock;
    pthread_cond_t ready;
    size_t have;                    // bytes of whole records waiting for this log's next flush
    char *pending, *flushing;       // PENDING records each, swapped by the writer
};

static int consumers_fd[LINKS];
static pthread_mutex_t consumer_lock[LINKS];

static void *log_writer(void *arg) {
    struct log *l = arg;
    for (;;) {
        pthread_mutex_lock(&l->lock);
        while (l->have == 0) pthread_cond_wait(&l->ready, &l->lock);
        char *batch = l->pending;
        size_t total = l->have;
        l->pending = l->flushing;
        l->flushing = batch;
        l->have = 0;
        pthread_mutex_unlock(&l->lock);
        write_all(l->fd, batch, total);
        if (fdatasync(l->fd) < 0) die("fdatasync");
        for (size_t off = 0; off < total; off += RECORD) {
            uint32_t to;
            memcpy(&to, batch + off, 4);
            pthread_mutex_lock(&consumer_lock[to % LINKS]);
            write_all(consumers_fd[to % LINKS], batch + off, RECORD);
            pthread_mutex_unlock(&consumer_lock[to % LINKS]);
        }
    }
    return NULL;
}

// ---- forwarder ----
struct conn { int fd; char role; int index; size_t have; char buf[RECORD * 64]; };

_Noreturn static void forward(int port, const char *fsync_dir, int logs) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 16) < 0) die("listen");
    int log = -1;
    static struct log lg[MAXLOGS];
    if (fsync_dir && logs > 0) {
        for (int i = 0; i < LINKS; i++) pthread_mutex_init(&consumer_lock[i], NULL);
        for (int i = 0; i < logs; i++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/latency_floor.%d.log", fsync_dir, i);
            lg[i].fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600);
            if (lg[i].fd < 0) die("open log");
            pthread_mutex_init(&lg[i].lock, NULL);
            pthread_cond_init(&lg[i].ready, NULL);
            lg[i].pending = malloc((size_t)RECORD * PENDING);
            lg[i].flushing = malloc((size_t)RECORD * PENDING);
            pthread_t t;
            pthread_create(&t, NULL, log_writer, &lg[i]);
        }
    } else if (fsync_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/latency_floor.log", fsync_dir);
        log = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600);
        if (log < 0) die("open log");
    }
    for (;;) {
        struct conn *c = calloc(MAXCONN, sizeof *c);
        int consumers[LINKS];
        int ep = epoll_create1(0);
        for (int i = 0; i < MAXCONN; i++) {
            int fd = accept(ls, NULL, NULL);
            if (fd < 0) die("accept");
            nodelay(fd);
            char hello[2];
            read_all(fd, hello, 2);
            c[i].fd = fd; c[i].role = hello[0]; c[i].index = hello[1] % LINKS;
            if (c[i].role == 'C') { consumers[c[i].index] = fd; consumers_fd[c[i].index] = fd; }
            else {
                fcntl(fd, F_SETFL, O_NONBLOCK);
                struct epoll_event e = { .events = EPOLLIN, .data.ptr = &c[i] };
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
            }
        }
        static char batch[RECORD * 64 * LINKS];
        int open_producers = LINKS;
        while (open_producers > 0) {
            struct epoll_event ev[MAXCONN];
            int n = epoll_wait(ep, ev, MAXCONN, -1);
            if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
            size_t total = 0;
            for (int k = 0; k < n; k++) {
                struct conn *p = ev[k].data.ptr;
                ssize_t r = read(p->fd, p->buf + p->have, sizeof p->buf - p->have);
                if (r == 0) { epoll_ctl(ep, EPOLL_CTL_DEL, p->fd, NULL); close(p->fd); open_producers--; continue; }
                if (r < 0) { if (errno == EAGAIN || errno == EINTR) continue; die("read"); }
                p->have += (size_t)r;
                size_t whole = p->have / RECORD * RECORD;
                memcpy(batch + total, p->buf, whole);
                total += whole;
                memmove(p->buf, p->buf + whole, p->have - whole);
                p->have -= whole;
            }
            if (total == 0) continue;
            if (logs > 0) {
                for (size_t off = 0; off < total; off += RECORD) {
                    uint32_t queue;
                    memcpy(&queue, batch + off + 4, 4);
                    struct log *l = &lg[queue % (uint32_t)logs];
                    pthread_mutex_lock(&l->lock);
                    if (l->have + RECORD > (size_t)RECORD * PENDING) die("log backlog");
                    memcpy(l->pending + l->have, batch + off, RECORD);
                    l->have += RECORD;
                    pthread_cond_signal(&l->ready);
                    pthread_mutex_unlock(&l->lock);
                }
                continue;
            }
            if (log >= 0) {
                write_all(log, batch, total);
                if (fdatasync(log) < 0) die("fdatasync");
            }
            for (size_t off = 0; off < total; off += RECORD) {
                uint32_t to;
                memcpy(&to, batch + off, 4);
                write_all(consumers[to % LINKS], batch + off, RECORD);
            }
        }
        for (int i = 0; i < LINKS; i++) close(consumers[i]);
        close(ep);
        free(c);
    }
}

// ---- sender and receiver ----
static int connect_to(int port, char role, int index) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    nodelay(fd);
    char hello[2] = { role, (char)index };
    write_all(fd, hello, 2);
    return fd;
}

struct recv_args { int fds[LINKS]; long expected; double *lat; long got; };

static void *receive(void *arg) {
    struct recv_args *r = arg;
    int ep = epoll_create1(0);
    static char buf[LINKS][RECORD * 64];
    size_t have[LINKS] = { 0 };
    for (int i = 0; i < LINKS; i++) {
        struct epoll_event e = { .events = EPOLLIN, .data.u32 = (uint32_t)i };
        epoll_ctl(ep, EPOLL_CTL_ADD, r->fds[i], &e);
    }
    while (r->got < r->expected) {
        struct epoll_event ev[LINKS];
        int n = epoll_wait(ep, ev, LINKS, 2000);
        if (n == 0) break;  // lost records: reported as fewer than sent
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int k = 0; k < n; k++) {
            int i = (int)ev[k].data.u32;
            ssize_t got = read(r->fds[i], buf[i] + have[i], sizeof buf[i] - have[i]);
            if (got <= 0) { if (got < 0 && errno == EINTR) continue; die("read"); }
            // Taken after the read: a record sent after epoll_wait returned may be in it.
            uint64_t t = now_ns();
            have[i] += (size_t)got;
            size_t off = 0;
            for (; off + RECORD <= have[i]; off += RECORD) {
                uint64_t sent;
                memcpy(&sent, buf[i] + off + 8, 8);
                if (r->got < r->expected) r->lat[r->got++] = (double)(t - sent) / 1e6;
            }
            memmove(buf[i], buf[i] + off, have[i] - off);
            have[i] -= off;
        }
    }
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// The q-quantile of n sorted values as relay bench takes it: the value at rank ceil(q * n).
static double pick(const double *sorted, long n, double q) {
    long rank = (long)(q * (double)n);
    if ((double)rank < q * (double)n) rank++;
    return sorted[rank > 0 ? rank - 1 : 0];
}

static int send_paced(int port, double rate, double seconds) {
    int producers[LINKS];
    struct recv_args r = { .expected = (long)(rate * seconds) };
    r.lat = calloc((size_t)r.expected, sizeof(double));
    for (int i = 0; i < LINKS; i++) producers[i] = connect_to(port, 'P', i);
    for (int i = 0; i < LINKS; i++) r.fds[i] = connect_to(port, 'C', i);
    pthread_t t;
    pthread_create(&t, NULL, receive, &r);
    char rec[RECORD];
    memset(rec, 0xab, sizeof rec);
    uint64_t start = now_ns() + 50000000u, interval = (uint64_t)(1e9 / rate);
    for (long i = 0; i < r.expected; i++) {
        uint64_t due = start + (uint64_t)i * interval;
        struct timespec ts = { .tv_sec = (time_t)(due / 1000000000u), .tv_nsec = (long)(due % 1000000000u) };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) { }
        uint32_t to = (uint32_t)(i % LINKS), queue = (uint32_t)(rand() % 100);
        uint64_t sent = now_ns();
        memcpy(rec, &to, 4);
        memcpy(rec + 4, &queue, 4);
        memcpy(rec + 8, &sent, 8);
        write_all(producers[i % LINKS], rec, RECORD);
    }
    pthread_join(t, NULL);
    for (int i = 0; i < LINKS; i++) { close(producers[i]); close(r.fds[i]); }
    qsort(r.lat, (size_t)r.got, sizeof(double), cmp);
    if (r.got == 0) { printf("received 0 of %ld\n", r.expected); return 1; }
    printf("received %ld of %ld  p50 %.3f  p99 %.3f  p99.9 %.3f  max %.3f ms\n", r.got, r.expected,
           pick(r.lat, r.got, 0.5), pick(r.lat, r.got, 0.99), pick(r.lat, r.got, 0.999), r.lat[r.got - 1]);
    return r.got == r.expected ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "forward") == 0) {
        const char *dir = argc >= 5 && strcmp(argv[3], "--fsync") == 0 ? argv[4] : NULL;
        int logs = dir && argc >= 7 && strcmp(argv[5], "--logs") == 0 ? atoi(argv[6]) : 0;
        if (logs < 0 || logs > MAXLOGS) { fprintf(stderr, "--logs: 1 to %d\n", MAXLOGS); return 2; }
        forward(atoi(argv[2]), dir, logs);
    }
    if (argc >= 5 && strcmp(argv[1], "send") == 0)
        return send_paced(atoi(argv[2]), atof(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: latency_floor forward PORT [--fsync DIR [--logs N]] | latency_floor send PORT RATE SECONDS\n");
    return 2;
}
