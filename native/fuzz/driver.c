/* A fuzzing driver for toolchains without libFuzzer (Apple clang, gcc): it runs the same
 * LLVMFuzzerTestOneInput on random mutations of the seed corpus for a bounded time or number of
 * runs. Mutations target what a bundle reader must survive: bit flips, byte overwrites with
 * JSON-significant characters, insertions, deletions, truncations, a rewritten length field and
 * splices of two inputs. Not coverage-guided; libFuzzer is used where it exists.
 *
 *     fuzz_bundle [-seconds=N] [-runs=N] [-seed=N] CORPUS_DIR
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t next(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static size_t below(size_t n) { return n ? (size_t)(next() % n) : 0; }

typedef struct {
    unsigned char *d;
    size_t n;
} blob;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char special[] = "{}[]\":,\\u0123456789-.eE \t\nxtrfalsnNI\x80\xff";

static size_t mutate(unsigned char *buf, size_t n, size_t cap, const blob *seeds, size_t nseeds) {
    int rounds = 1 + (int)below(8), r;
    for (r = 0; r < rounds; r++) {
        size_t at = below(n + 1), k, len;
        switch (below(8)) {
        case 0: if (n) buf[below(n)] ^= (unsigned char)(1u << below(8)); break;
        case 1: if (n) buf[below(n)] = (unsigned char)special[below(sizeof special - 1)]; break;
        case 2: if (n) buf[below(n)] = (unsigned char)next(); break;
        case 3: /* insert */
            len = 1 + below(16);
            if (n + len <= cap) {
                memmove(buf + at + len, buf + at, n - at);
                for (k = 0; k < len; k++)
                    buf[at + k] = (unsigned char)(below(2) ? special[below(sizeof special - 1)] : next());
                n += len;
            }
            break;
        case 4: /* delete */
            if (at < n) {
                len = 1 + below(n - at < 32 ? n - at : 32);
                memmove(buf + at, buf + at + len, n - at - len);
                n -= len;
            }
            break;
        case 5: n = below(n + 1); break; /* truncate */
        case 6: /* header length field */
            if (n >= 8) {
                uint64_t v = below(4) == 0 ? next() : (uint64_t)below(n + 64);
                for (k = 0; k < 8; k++)
                    buf[k] = (unsigned char)(v >> (8 * k));
            }
            break;
        default: { /* splice: keep our prefix, take another input's suffix */
            const blob *o = &seeds[below(nseeds)];
            size_t from = below(o->n + 1);
            len = o->n - from;
            if (at + len <= cap) {
                memcpy(buf + at, o->d + from, len);
                n = at + len;
            }
        }
        }
    }
    return n;
}

int main(int argc, char **argv) {
    double seconds = 60, start;
    long runs = -1, done = 0;
    const char *dir = NULL;
    blob seeds[256];
    size_t nseeds = 0, cap = 0, k;
    unsigned char *buf;
    DIR *d;
    struct dirent *e;
    int i;
    for (i = 1; i < argc; i++) {
        if (strncmp(argv[i], "-seconds=", 9) == 0) seconds = atof(argv[i] + 9);
        else if (strncmp(argv[i], "-runs=", 6) == 0) runs = atol(argv[i] + 6);
        else if (strncmp(argv[i], "-seed=", 6) == 0) rng_state = (uint64_t)atoll(argv[i] + 6) | 1;
        else dir = argv[i];
    }
    if (!dir || !(d = opendir(dir))) {
        fprintf(stderr, "usage: %s [-seconds=N] [-runs=N] [-seed=N] CORPUS_DIR\n", argv[0]);
        return 2;
    }
    while ((e = readdir(d)) && nseeds < 256) {
        char path[4096];
        FILE *f;
        long len;
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (!(f = fopen(path, "rb")))
            continue;
        if (fseek(f, 0, SEEK_END) == 0 && (len = ftell(f)) > 0 && len < (1 << 20) && fseek(f, 0, SEEK_SET) == 0) {
            seeds[nseeds].d = (unsigned char *)malloc((size_t)len);
            if (seeds[nseeds].d && fread(seeds[nseeds].d, 1, (size_t)len, f) == (size_t)len) {
                seeds[nseeds].n = (size_t)len;
                if ((size_t)len > cap)
                    cap = (size_t)len;
                nseeds++;
            } else {
                free(seeds[nseeds].d);
            }
        }
        fclose(f);
    }
    closedir(d);
    if (!nseeds) {
        fprintf(stderr, "no seeds in %s\n", dir);
        return 2;
    }
    cap = cap * 2 + 1024;
    buf = (unsigned char *)malloc(cap);
    for (k = 0; k < nseeds; k++)
        LLVMFuzzerTestOneInput(seeds[k].d, seeds[k].n);
    start = now();
    while ((runs < 0 || done < runs) && now() - start < seconds) {
        const blob *s = &seeds[below(nseeds)];
        size_t n;
        memcpy(buf, s->d, s->n);
        n = mutate(buf, s->n, cap, seeds, nseeds);
        LLVMFuzzerTestOneInput(buf, n);
        done++;
    }
    printf("fuzz driver: %ld runs over %zu seeds in %.1f s (%.0f exec/s), no crash\n", done, nseeds, now() - start,
           done / (now() - start + 1e-9));
    for (k = 0; k < nseeds; k++)
        free(seeds[k].d);
    free(buf);
    return 0;
}
