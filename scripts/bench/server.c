/* A steady-load request server, simulated in-process: each request parses its line (temporary
 * copies freed at the end), looks up an LRU cache of 1,000 entries over 5,000 keys (a miss
 * allocates an entry, evicting the least recently used), builds a response and frees it. One
 * request in 200 takes the session path, whose remember_session() leaks 64 bytes: the slow
 * leak the benchmark checks each tool names.
 *   server REQUESTS */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CAP 1000
#define KEYS 5000
#define BUCKETS 2048

struct entry {
    unsigned key;
    char *value;
    struct entry *prev, *next, *chain;
};

static struct entry *buckets[BUCKETS];
static struct entry *head, *tail; /* most / least recently used */
static int cached;
static uint64_t rng = 0x2545F4914F6CDD1Dull;
static void *volatile sessions;

static unsigned next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng >> 16);
}

static void unlink_lru(struct entry *e) {
    if (e->prev) e->prev->next = e->next; else head = e->next;
    if (e->next) e->next->prev = e->prev; else tail = e->prev;
}

static void push_front(struct entry *e) {
    e->prev = NULL;
    e->next = head;
    if (head) head->prev = e;
    head = e;
    if (!tail) tail = e;
}

__attribute__((noinline)) static void evict(void) {
    struct entry *e = tail;
    unlink_lru(e);
    struct entry **pp = &buckets[e->key % BUCKETS];
    while (*pp != e) pp = &(*pp)->chain;
    *pp = e->chain;
    free(e->value);
    free(e);
    cached--;
}

__attribute__((noinline)) static const char *cache_get(unsigned key) {
    for (struct entry *e = buckets[key % BUCKETS]; e; e = e->chain)
        if (e->key == key) {
            unlink_lru(e);
            push_front(e);
            return e->value;
        }
    struct entry *e = malloc(sizeof *e);
    size_t len = 64 + key % 448;
    e->key = key;
    e->value = malloc(len);
    memset(e->value, 'a' + key % 26, len - 1);
    e->value[len - 1] = 0;
    e->chain = buckets[key % BUCKETS];
    buckets[key % BUCKETS] = e;
    push_front(e);
    if (++cached > CAP) evict();
    return e->value;
}

__attribute__((noinline)) static void remember_session(unsigned key) {
    unsigned *s = malloc(64); /* never freed: the slow leak */
    s[0] = key;
    sessions = s;
}

__attribute__((noinline)) static size_t handle(const char *line) {
    char *copy = strdup(line);
    char *path = strchr(copy, ' ');
    unsigned key = (unsigned)strtoul(path ? path + 1 : copy, NULL, 10);
    const char *value = cache_get(key);
    size_t n = strlen(value) + strlen(copy) + 32;
    char *response = malloc(n);
    snprintf(response, n, "200 %s %.16s", copy, value);
    if (strncmp(copy, "POST", 4) == 0) remember_session(key);
    size_t len = strlen(response);
    free(response);
    free(copy);
    return len;
}

int main(int argc, char **argv) {
    long requests = argc > 1 ? atol(argv[1]) : 200000;
    size_t total = 0;
    char line[64];
    for (long i = 0; i < requests; i++) {
        unsigned r = next();
        /* Skewed keys: most requests hit a hot fifth of the key space. */
        unsigned key = (r & 7) ? r % (KEYS / 5) : r % KEYS;
        snprintf(line, sizeof line, "%s %u", i % 200 == 199 ? "POST" : "GET", key);
        total += handle(line);
    }
    while (cached) evict();
    printf("%ld requests, %zu bytes\n", requests, total);
    return 0;
}
