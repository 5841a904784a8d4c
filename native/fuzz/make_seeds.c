/* Writes the fuzzing seed corpus: small valid bundles of several shapes (testutil.h), so the
 * fuzzer starts from inputs that reach the deep checks instead of failing at the first byte. */
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void write_seed(const char *dir, const char *name, const tu_config *c) {
    char path[1024];
    size_t n;
    unsigned char *d = tu_build(c, &n);
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "wb");
    if (!f || fwrite(d, 1, n, f) != n) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fclose(f);
    free(d);
}

int main(int argc, char **argv) {
    tu_config c;
    if (argc != 2) {
        fprintf(stderr, "usage: make_seeds DIR\n");
        return 2;
    }
    memset(&c, 0, sizeof c);
    c.obs = 8; c.n_enc = 1; c.enc[0] = 32; c.hidden = 8; c.actions = 3; c.clip = 5; c.seed = 1;
    write_seed(argv[1], "fp32.safetensors", &c);
    c.bits[0] = 8; c.group[0] = 32;      /* hidden 8: the LSTM stays fp32, the encoder input 8 cannot be grouped */
    c.obs = 32; c.bits[0] = 8; c.group[0] = 32; c.bits[1] = 4; c.group[1] = 32;
    write_seed(argv[1], "mixed.safetensors", &c);
    memset(&c, 0, sizeof c);
    c.obs = 4; c.hidden = 32; c.actions = 2; c.continuous = 1; c.seed = 2;
    c.bits[1] = 4; c.group[1] = 32; c.bits[2] = 8; c.group[2] = 32;
    write_seed(argv[1], "continuous.safetensors", &c);
    return 0;
}
