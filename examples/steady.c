/* A steady-load server, simulated in-process, with the three behaviours a leak hunter must tell
 * apart. Each request parses its line into temporaries (freed at its end), looks its key up in an
 * LRU cache of 600 entries over 600 keys (it fills during the first seconds, then stays full: a
 * plateau), and one request in 20 takes the login path, where remember_session() keeps a 48-byte
 * session that nothing ever frees (the slow leak). --fixed frees the session when the request
 * ends. --mark N marks a snapshot named req-<count> every N requests through leakhunt's C API
 * (a weak symbol: without leakhunt the calls are skipped).
 *   steady [--seconds N] [--rate REQUESTS_PER_S] [--fixed] [--mark N]
 * With leakhunt: leakhunt run --epoch 250ms -- ./steady --seconds 8 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CACHE_CAP 600
#define KEYS 600

struct entry {
    unsigned key;
    char *value;
    struct entry *prev, *next;
};

static struct entry *by_key[KEYS];
static struct entry *mru, *lru;
static int cached;
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static void *volatile last_session;

/* leakhunt's snapshot API, present only when the program runs under leakhunt. */
extern void leakhunt_snapshot(const char *name) __attribute__((weak));

static unsigned next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng >> 16);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void unlink_entry(struct entry *e) {
    if (e->prev) e->prev->next = e->next; else mru = e->next;
    if (e->next) e->next->prev = e->prev; else lru = e->prev;
}

static void push_mru(struct entry *e) {
    e->prev = NULL;
    e->next = mru;
    if (mru) mru->prev = e;
    mru = e;
    if (!lru) lru = e;
}

/* The cache: bounded, so it grows while it warms up and then stays flat. */
__attribute__((noinline)) static const char *cache_lookup(unsigned key) {
    struct entry *e = by_key[key];
    if (e) {
        unlink_entry(e);
        push_mru(e);
        return e->value;
    }
    if (cached == CACHE_CAP) {
        struct entry *old = lru;
        unlink_entry(old);
        by_key[old->key] = NULL;
        free(old->value);
        free(old);
        cached--;
    }
    e = malloc(sizeof *e);
    e->key = key;
    e->value = malloc(200);
    snprintf(e->value, 200, "value of %u", key);
    by_key[key] = e;
    push_mru(e);
    cached++;
    return e->value;
}

/* The leak: a session kept for every login, never released. */
__attribute__((noinline)) static void *remember_session(unsigned user) {
    unsigned *s = malloc(48);
    s[0] = user;
    last_session = s;
    return s;
}

__attribute__((noinline)) static size_t handle_request(const char *line, int fixed) {
    char *copy = strdup(line); /* temporaries: freed below */
    char *space = strchr(copy, ' ');
    unsigned key = (unsigned)strtoul(space ? space + 1 : copy, NULL, 10) % KEYS;
    char *reply = malloc(256);
    snprintf(reply, 256, "200 %s", cache_lookup(key));
    if (strncmp(copy, "LOGIN", 5) == 0) {
        void *session = remember_session(key);
        if (fixed) free(session);
    }
    size_t n = strlen(reply);
    free(reply);
    free(copy);
    return n;
}

int main(int argc, char **argv) {
    double seconds = 8;
    double rate = 2000;
    int fixed = 0;
    long mark = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = atof(argv[++i]);
        else if (!strcmp(argv[i], "--fixed")) fixed = 1;
        else if (!strcmp(argv[i], "--mark") && i + 1 < argc) mark = atol(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--seconds N] [--rate REQUESTS_PER_S] [--fixed] [--mark N]\n",
                    argv[0]);
            return 2;
        }
    }
    /* Steady load: requests in 5 ms ticks at the given rate. */
    double start = now_s(), tick = 0.005;
    long done = 0;
    size_t bytes = 0;
    char line[64];
    for (int t = 0; now_s() - start < seconds; t++) {
        long due = (long)((t + 1) * tick * rate);
        for (; done < due; done++) {
            snprintf(line, sizeof line, "%s %u", done % 20 == 19 ? "LOGIN" : "GET", next());
            bytes += handle_request(line, fixed);
            if (mark > 0 && (done + 1) % mark == 0 && leakhunt_snapshot) {
                char name[32];
                snprintf(name, sizeof name, "req-%ld", done + 1);
                leakhunt_snapshot(name);
            }
        }
        double until = start + (t + 1) * tick;
        double wait = until - now_s();
        if (wait > 0) {
            struct timespec ts = {0, (long)(wait * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    printf("%ld requests, %zu bytes of replies\n", done, bytes);
    return 0;
}
