/* C-level benchmark: the step alone (no Python), for the reference model in fp32, int8 and int4
 * at batch 1 and 64, with the kernel the CPU gets (or COGBERT_KERNEL=1 for scalar). Prints one
 * JSON object; min/p50/p99 are per call, in microseconds. One thread. Each row also carries the
 * peak multiply-add rate of the kernel's instruction, measured just before it (bench/peak.c),
 * and the fraction of it the step reached (at its p50).
 *
 *     native/build/bench_step [steps]   or a bundle: native/build/bench_step steps file.safetensors
 */
#define _POSIX_C_SOURCE 199309L
#include "cogbert.h"
#include "peak.h"
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int row(const char *quant, cogbert_policy *p, size_t batch, int steps, int first) {
    double peak, gmacs;
    cogbert_state *s = NULL;
    cogbert_info info;
    float *obs, *head, *value;
    double *t, total = 0;
    int i;
    size_t k;
    uint32_t seed = 1;
    cogbert_get_info(p, &info);
    if (cogbert_state_create(p, batch, &s) != COGBERT_OK)
        return 1;
    obs = (float *)malloc(64 * batch * info.obs_dim * sizeof(float));
    head = (float *)malloc(batch * info.action_size * sizeof(float));
    value = (float *)malloc(batch * sizeof(float));
    t = (double *)malloc((size_t)steps * sizeof(double));
    for (k = 0; k < 64 * batch * info.obs_dim; k++) {
        seed ^= seed << 13; seed ^= seed >> 17; seed ^= seed << 5;
        obs[k] = (float)((seed >> 8) * (1.0 / 8388608.0)) * 4.0f - 2.0f;
    }
    for (i = 0; i < steps / 10 + 10; i++)
        cogbert_step_batch(p, s, batch, obs + (size_t)(i % 64) * batch * info.obs_dim, head, value);
    for (i = 0; i < steps; i++) {
        double t0 = now_us();
        cogbert_step_batch(p, s, batch, obs + (size_t)(i % 64) * batch * info.obs_dim, head, value);
        t[i] = now_us() - t0;
        total += t[i];
    }
    qsort(t, (size_t)steps, sizeof *t, cmp);
    /* GMAC/s at the median call: on a shared machine the mean carries other processes' time. */
    gmacs = (double)info.macs_per_step * batch / (t[steps / 2] * 1e3);
    peak = cb_peak_gmacs(info.kernel, info.weight_bits != 32);
    printf("%s{\"quant\":\"%s\",\"batch\":%lu,\"kernel\":%d,\"min_us\":%.2f,\"p50_us\":%.2f,\"p99_us\":%.2f,"
           "\"mean_us\":%.2f,\"decisions_per_s\":%.0f,\"gmacs\":%.2f,\"peak_gmacs\":%.2f,\"fraction_of_peak\":%.3f,"
           "\"policy_bytes\":%lu}",
           first ? "" : ",", quant, (unsigned long)batch, info.kernel, t[0], t[steps / 2], t[(size_t)(steps * 0.99)],
           total / steps, batch * steps / (total / 1e6), gmacs, peak, peak > 0 ? gmacs / peak : 0.0,
           (unsigned long)info.policy_bytes);
    free(obs); free(head); free(value); free(t);
    cogbert_state_destroy(s);
    return 0;
}

int main(int argc, char **argv) {
    int steps = argc > 1 ? atoi(argv[1]) : 5000, bits[3] = {0, 8, 4}, q, first = 1;
    const char *names[3] = {"fp32", "int8", "int4"};
    size_t batches[2] = {1, 64}, b;
    cogbert_options o;
    cogbert_options_init(&o);
    if (getenv("COGBERT_KERNEL"))
        o.kernel = atoi(getenv("COGBERT_KERNEL"));
    if (steps < 100)
        steps = 100;
    printf("{\"suite\":\"native-c\",\"version\":\"%s\",\"steps\":%d,\"results\":[", cogbert_version_string(), steps);
    for (q = 0; q < 3; q++) {
        cogbert_policy *p = NULL;
        cogbert_error err;
        if (argc > 2) {
            if (q)
                break;
            if (cogbert_open_file(argv[2], &o, &p, &err) != COGBERT_OK) {
                fprintf(stderr, "%s\n", err.message);
                return 1;
            }
        } else {
            tu_config c = tu_reference(bits[q]);
            size_t n;
            unsigned char *d = tu_build(&c, &n);
            int rc = cogbert_open_buffer(d, n, &o, &p, &err);
            free(d);
            if (rc != COGBERT_OK) {
                fprintf(stderr, "%s\n", err.message);
                return 1;
            }
        }
        for (b = 0; b < 2; b++) {
            row(argc > 2 ? "file" : names[q], p, batches[b], batches[b] == 1 ? steps : steps / 10, first);
            first = 0;
        }
        cogbert_close(p);
    }
    printf("]}\n");
    return 0;
}
