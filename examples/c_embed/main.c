/* A device application's decision loop in C, against the Cogbert native runtime.
 *
 * It includes only cogbert.h and links libcogbert (static or shared), nothing else but libc/libm:
 *
 *     make -C native                        # builds native/build/libcogbert.a and this example
 *     cc -Inative/include examples/c_embed/main.c native/build/libcogbert.a -lm -o c_embed
 *     ./c_embed model.safetensors [steps]
 *
 * Make a bundle with `cogbert bundle init model.safetensors` (then `cogbert bundle quantize` for
 * int8/int4). Each controlled unit is a session with its own recurrent state, owned by the
 * application; the policy (weights) is shared and immutable.
 */
#include "cogbert.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define UNITS 3

static double now_seconds(void) {
    return (double)clock() / CLOCKS_PER_SEC;
}

/* Uniform numbers for sampling: any generator will do; this one is small and has no state
 * outside the application. */
static double uniform(unsigned long long *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(*s >> 11) * (1.0 / 9007199254740992.0);
}

int main(int argc, char **argv) {
    cogbert_policy *policy = NULL;
    cogbert_state *states[UNITS] = {NULL};
    cogbert_error err;
    cogbert_info info;
    float *obs = NULL;
    long steps = argc > 2 ? atol(argv[2]) : 200, t;
    unsigned long long rng = 42;
    double started, value_sum = 0.0;
    long counts[64] = {0};
    int u, rc = 1;
    size_t k;

    if (argc < 2) {
        fprintf(stderr, "usage: %s model.safetensors [steps]\n", argv[0]);
        return 2;
    }
    if (cogbert_open_file(argv[1], NULL, &policy, &err) != COGBERT_OK) {
        fprintf(stderr, "cannot load %s: %s (%s)\n", argv[1], err.message, cogbert_strerror(err.status));
        return 1;
    }
    cogbert_get_info(policy, &info);
    if (info.action_kind != COGBERT_ACTION_DISCRETE) {
        fprintf(stderr, "this example drives discrete-action models\n");
        goto done;
    }
    for (u = 0; u < UNITS; u++)
        if (cogbert_state_create(policy, 1, &states[u]) != COGBERT_OK)
            goto done;
    obs = (float *)malloc(info.obs_dim * sizeof(float));
    if (!obs)
        goto done;

    started = now_seconds();
    for (t = 0; t < steps; t++) {
        for (u = 0; u < UNITS; u++) {
            int32_t action;
            double log_prob;
            float value;
            int status;
            for (k = 0; k < info.obs_dim; k++) /* a sensor reading would go here */
                obs[k] = (float)sin(0.1 * (double)t + u + (double)k);
            status = cogbert_decide(policy, states[u], obs, uniform(&rng), 0, &action, &log_prob, &value);
            if (status == COGBERT_ERR_NONFINITE) { /* a broken sensor: skip the decision, keep the state */
                fprintf(stderr, "unit %d: %s\n", u, cogbert_strerror(status));
                continue;
            }
            if (status != COGBERT_OK) {
                fprintf(stderr, "unit %d: %s\n", u, cogbert_strerror(status));
                goto done;
            }
            /* apply `action` to the unit here; keep log_prob and value for the experience log */
            if (action >= 0 && action < 64)
                counts[action]++;
            value_sum += value;
        }
    }
    printf("model %s (%s weights, kernel %d): %ld decisions in %.3f s, mean value %.4f\n", cogbert_model_id(policy),
           info.weight_bits == 32 ? "fp32" : info.weight_bits == 8 ? "int8" : "int4", info.kernel, steps * UNITS,
           now_seconds() - started, value_sum / (double)(steps * UNITS));
    printf("actions:");
    for (k = 0; k < info.action_size && k < 64; k++)
        printf(" %ld", counts[k]);
    printf("\n");
    rc = 0;
done:
    free(obs);
    for (u = 0; u < UNITS; u++)
        cogbert_state_destroy(states[u]);
    cogbert_close(policy);
    return rc;
}
