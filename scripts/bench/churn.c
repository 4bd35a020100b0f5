/* Allocator churn at the bottom of a deep stack: each thread descends DEPTH frames, then makes OPS
 * calls of malloc, calloc, realloc and free (random sizes, 256 live slots per thread). Every
 * 50,000 calls one 40-byte block leaks from leak_here(): the known leak the benchmark checks each
 * tool names. Built with and without frame pointers by scripts/bench/run.
 *   churn THREADS OPS [DEPTH]   (DEPTH counts main and the thread function: 20 by default) */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long ops;
static int depth = 20;
static void *volatile keep;

__attribute__((noinline)) static void leak_here(void) {
    keep = malloc(40); /* never freed */
}

__attribute__((noinline)) static uint64_t churn(uint64_t rng) {
    void *slots[256] = {0};
    for (long i = 0; i < ops; i++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        unsigned k = rng & 255;
        size_t size = 16 + (rng >> 20) % 1000;
        switch ((rng >> 12) & 3) {
        case 0: free(slots[k]); slots[k] = malloc(size); break;
        case 1: free(slots[k]); slots[k] = calloc(1, size); break;
        case 2: {
            void *p = realloc(slots[k], size);
            if (p) slots[k] = p;
            break;
        }
        default: free(slots[k]); slots[k] = NULL; break;
        }
        if (i % 50000 == 49999) leak_here();
    }
    for (int k = 0; k < 256; k++) free(slots[k]);
    return rng;
}

__attribute__((noinline)) static uint64_t descend(int d, uint64_t rng) {
    if (d <= 1) return churn(rng);
    uint64_t r = descend(d - 1, rng + 1);
    return r ^ (uint64_t)d; /* not a tail call: every level keeps its frame */
}

static void *thread_main(void *arg) {
    uintptr_t seed = (uintptr_t)arg;
    uint64_t r = descend(depth - 2, 0x9E3779B97F4A7C15ull * (seed + 1));
    return (void *)(uintptr_t)(r & 1);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    ops = argc > 2 ? atol(argv[2]) : 1000000;
    if (argc > 3) depth = atoi(argv[3]);
    pthread_t t[64];
    if (threads < 1 || threads > 64) return 2;
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, thread_main, (void *)(uintptr_t)i);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    printf("%d threads x %ld calls\n", threads, ops);
    return 0;
}
