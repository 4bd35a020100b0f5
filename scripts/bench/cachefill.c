/* A cache that fills at once, then churns at its size: 3,000 entries of 640 bytes filled in the
 * first half second, then for the rest of the run each request replaces a random entry (frees the
 * old, allocates the new). Memory grows from about nothing to 1.9 MB in a step, then stays level:
 * a plateau, never a leak. Also a small leak beside it: 48 bytes every 10 ms.
 *   cachefill [SECONDS]      (default 4) */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define ENTRIES 3000

static char *cache[ENTRIES];
static void *leaked;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static char *make_entry(void) {
    char *e = malloc(640);
    memset(e, 1, 640);
    return e;
}

static void leak_a_little(void) {
    void **p = malloc(48);
    *p = leaked;
    leaked = p;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 4.0;
    double start = now();
    unsigned rng = 12345;
    int filled = 0;
    while (now() - start < seconds) {
        if (now() - start > 0.3 && filled < ENTRIES) {
            for (int i = 0; i < ENTRIES / 4 && filled < ENTRIES; i++)
                cache[filled++] = make_entry();
        } else if (filled == ENTRIES) {
            for (int i = 0; i < 200; i++) {
                rng = rng * 1103515245 + 12345;
                int k = (rng >> 8) % ENTRIES;
                free(cache[k]);
                cache[k] = make_entry();
            }
        }
        leak_a_little();
        usleep(10000);
    }
    return 0;
}
