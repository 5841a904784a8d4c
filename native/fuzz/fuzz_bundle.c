/* Fuzz target for the bundle reader (and, when a mutated bundle still opens, one step of it).
 * Built with libFuzzer (`make -C native fuzz` with clang), or with driver.c where libFuzzer is
 * not available (Apple clang, gcc). Every input must give a status, never a crash, a leak, an
 * out-of-bounds read or undefined behaviour (the builds run ASan + UBSan). */
#include "cogbert.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cogbert_policy *p = (cogbert_policy *)(uintptr_t)1;
    cogbert_error err;
    int rc = cogbert_open_buffer(data, size, NULL, &p, &err);
    if (rc != COGBERT_OK) {
        /* A refusal names its problem and leaves nothing behind. */
        if (p != NULL || err.status != rc || err.message[0] == 0)
            abort();
        return 0;
    }
    {
        cogbert_info info;
        cogbert_state *s = NULL;
        cogbert_get_info(p, &info);
        if (info.macs_per_step <= 2000000 && cogbert_state_create(p, 2, &s) == COGBERT_OK) {
            float *obs = (float *)calloc(2 * info.obs_dim, sizeof(float));
            float *head = (float *)calloc(2 * info.action_size, sizeof(float));
            float value[2];
            if (obs && head) {
                size_t k;
                for (k = 0; k < 2 * info.obs_dim; k++)
                    obs[k] = (float)(k % 7) - 3.0f;
                if (cogbert_step_batch(p, s, 2, obs, head, value) != COGBERT_OK)
                    abort();
            }
            free(obs);
            free(head);
            cogbert_state_destroy(s);
        }
    }
    cogbert_close(p);
    return 0;
}
