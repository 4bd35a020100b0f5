/* Churn from stacks that vary: every operation descends a 20-deep call chain that branches at four
 * levels (5, 9, 13 and 17) into one of WAYS copies of that level's function, picked by the
 * operation's random number, so consecutive allocations come from different stacks: WAYS^4
 * distinct stacks per allocation kind (1, 16, 81, 256). The leaf makes one call of malloc,
 * calloc, realloc or free (16 B to 4 KiB), on up to LIVE live blocks per thread. Every 50,000
 * operations one 40-byte block leaks from leak_here(): the known leak each tool must name.
 *   branchy THREADS OPS WAYS [LIVE]      (WAYS 1-4; LIVE default 8192) */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static long ops;
static unsigned ways = 2, live = 8192;
static void *volatile keep;

__attribute__((noinline)) static void leak_here(void) {
    keep = malloc(40); /* never freed */
}

struct ctx {
    void **slots;
    long i;
};

__attribute__((noinline)) static uint64_t leaf(uint64_t r, struct ctx *c) {
    unsigned k = (r >> 24) % live;
    size_t size = 16 + (r >> 36) % 4081;
    switch ((r >> 8) & 3) {
    case 0: free(c->slots[k]); c->slots[k] = malloc(size); break;
    case 1: free(c->slots[k]); c->slots[k] = calloc(1, size); break;
    case 2: {
        void *p = realloc(c->slots[k], size);
        if (p) c->slots[k] = p;
        break;
    }
    default: free(c->slots[k]); c->slots[k] = NULL; break;
    }
    if (++c->i % 50000 == 0) leak_here();
    return r;
}

/* One level: calls the next, and is not a tail call (its frame stays). */
#define LEVEL(n, next)                                                                        \
    __attribute__((noinline)) static uint64_t l##n(uint64_t r, struct ctx *c) {               \
        return next(r, c) ^ (uint64_t)n;                                                      \
    }
/* A branching level: WAYS copies, each its own code (the constant differs), picked by r. */
#define COPY(n, v, next)                                                                      \
    __attribute__((noinline)) static uint64_t l##n##_##v(uint64_t r, struct ctx *c) {         \
        return next(r, c) ^ (uint64_t)(n * 16 + v);                                           \
    }
#define BRANCH(n, shift, next)                                                                \
    COPY(n, 0, next) COPY(n, 1, next) COPY(n, 2, next) COPY(n, 3, next)                       \
    static uint64_t (*const t##n[4])(uint64_t, struct ctx *) = {l##n##_0, l##n##_1, l##n##_2, \
                                                                l##n##_3};                    \
    __attribute__((noinline)) static uint64_t l##n(uint64_t r, struct ctx *c) {               \
        return t##n[(r >> shift) % ways](r, c) ^ 1;                                           \
    }

LEVEL(20, leaf)
LEVEL(19, l20)
LEVEL(18, l19)
BRANCH(17, 50, l18)
LEVEL(16, l17)
LEVEL(15, l16)
LEVEL(14, l15)
BRANCH(13, 52, l14)
LEVEL(12, l13)
LEVEL(11, l12)
LEVEL(10, l11)
BRANCH(9, 54, l10)
LEVEL(8, l9)
LEVEL(7, l8)
LEVEL(6, l7)
BRANCH(5, 56, l6)
LEVEL(4, l5)
LEVEL(3, l4)
LEVEL(2, l3)
LEVEL(1, l2)

static void *thread_main(void *arg) {
    uint64_t r = 0x9E3779B97F4A7C15ull * ((uintptr_t)arg + 1);
    struct ctx c = {calloc(live, sizeof(void *)), 0};
    for (long i = 0; i < ops; i++) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        l1(r, &c);
    }
    for (unsigned k = 0; k < live; k++) free(c.slots[k]);
    free(c.slots);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    ops = argc > 2 ? atol(argv[2]) : 1000000;
    ways = argc > 3 ? (unsigned)atoi(argv[3]) : 2;
    if (argc > 4) live = (unsigned)atoi(argv[4]);
    if (ways < 1 || ways > 4 || live < 1 || threads < 1) {
        fprintf(stderr, "usage: branchy THREADS OPS WAYS(1-4) [LIVE]\n");
        return 2;
    }
    pthread_t t[256];
    if (threads > 256) threads = 256;
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, thread_main, (void *)(uintptr_t)i);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    printf("branchy: %d threads x %ld ops, %u ways\n", threads, ops, ways);
    return 0;
}
