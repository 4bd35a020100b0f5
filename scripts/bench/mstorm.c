/* Malloc storm with deep stacks: descends DEPTH (default 20) frames, then makes OPS allocator
 * calls (malloc/free of random sizes over a working set of 256 blocks). Built without frame
 * pointers, so leakhunt unwinds every stack with DWARF CFI. Frees everything. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static long ops = 2000000;
static void *slots[256];

__attribute__((noinline)) static uint64_t storm(uint64_t rng) {
    for (long i = 0; i < ops; i++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        unsigned k = rng & 255;
        free(slots[k]);
        slots[k] = malloc(16 + (rng >> 20) % 1000);
    }
    return rng;
}

__attribute__((noinline)) static uint64_t descend(int depth, uint64_t rng) {
    if (depth <= 1)
        return storm(rng);
    uint64_t r = descend(depth - 1, rng + 1);
    return r ^ (uint64_t)depth; /* keeps the call from being a tail call */
}

int main(int argc, char **argv) {
    int depth = argc > 1 ? atoi(argv[1]) : 20;
    if (argc > 2) ops = atol(argv[2]);
    /* main + descend x (depth - 1) + storm = depth frames below the allocator */
    uint64_t r = descend(depth - 1, 0x9E3779B97F4A7C15ull);
    for (int k = 0; k < 256; k++) free(slots[k]);
    printf("%llu\n", (unsigned long long)(r & 0xff));
    return 0;
}
