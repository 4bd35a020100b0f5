/* Ingest against a large live set that churns at random: N blocks of 16-512 bytes, then R times
 * one of them, picked at random, freed and a block of another size allocated in its place. The
 * frees land all over the heap (no two near each other in time) and the allocations in the
 * allocator's free lists as much as at its top: the live set's worst case, where the growing
 * heap of `bigheap` is its best. Every block stays reachable from a global array to the end.
 *
 *   bigchurn N R */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static void **blocks;
static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    long r = argc > 2 ? atol(argv[2]) : n;
    if (n < 1)
        return 2;
    blocks = malloc(n * sizeof *blocks);
    if (!blocks)
        return 1;
    for (long i = 0; i < n; i++)
        if (!(blocks[i] = malloc(16 + next() % 497)))
            return 1;
    for (long j = 0; j < r; j++) {
        long k = (long)(next() % (uint64_t)n);
        free(blocks[k]);
        if (!(blocks[k] = malloc(16 + next() % 497)))
            return 1;
    }
    printf("%ld blocks, %ld replaced\n", n, r);
    return 0;
}
