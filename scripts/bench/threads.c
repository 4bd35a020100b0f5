/* Many threads, each churning: THREADS threads (up to 1024) each make OPS calls of malloc, calloc,
 * realloc and free (16 B-1 KiB, 64 live slots a thread) from a few call paths, then wait until
 * every thread has finished its calls before any exits, so that all of them are alive together
 * at the peak: the peak RSS of the process minus that of the program alone, divided by THREADS,
 * is what tracing adds per thread that allocates; the time, per event, how the tracer scales
 * with threads (scripts/bench/run --only threads). One 40-byte block per thread leaks from
 * leak_here().
 *   threads THREADS OPS */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static long ops;
static pthread_barrier_t done;
static void *volatile keep[1024];

__attribute__((noinline)) static void leak_here(int t) {
    keep[t] = malloc(40); /* never freed */
}

__attribute__((noinline)) static void *path_a(size_t n) { return malloc(n); }
__attribute__((noinline)) static void *path_b(size_t n) { return calloc(1, n); }
__attribute__((noinline)) static void *path_c(void *p, size_t n) { return realloc(p, n); }

__attribute__((noinline)) static uint64_t churn(uint64_t rng) {
    void *slots[64] = {0};
    for (long i = 0; i < ops; i++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        unsigned k = rng & 63;
        size_t size = 16 + (rng >> 20) % 1000;
        switch ((rng >> 12) & 3) {
        case 0: free(slots[k]); slots[k] = path_a(size); break;
        case 1: free(slots[k]); slots[k] = path_b(size); break;
        case 2: {
            void *p = path_c(slots[k], size);
            if (p) slots[k] = p;
            break;
        }
        default: free(slots[k]); slots[k] = NULL; break;
        }
    }
    for (int k = 0; k < 64; k++) free(slots[k]);
    return rng;
}

static void *thread_main(void *arg) {
    uintptr_t t = (uintptr_t)arg;
    uint64_t r = churn(0x9E3779B97F4A7C15ull * (t + 1));
    leak_here((int)t);
    pthread_barrier_wait(&done);
    return (void *)(uintptr_t)(r & 1);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    ops = argc > 2 ? atol(argv[2]) : 100000;
    static pthread_t t[1024];
    if (threads < 1 || threads > 1024) return 2;
    pthread_barrier_init(&done, NULL, (unsigned)threads);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);
    for (int i = 0; i < threads; i++)
        if (pthread_create(&t[i], &attr, thread_main, (void *)(uintptr_t)i)) return 3;
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    printf("%d threads x %ld calls\n", threads, ops);
    return 0;
}
