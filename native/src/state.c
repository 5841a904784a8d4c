/* Recurrent states: h, c and the scratch a step needs, in one block allocated at creation so
 * that the decision path never allocates. */
#include "internal.h"

#include <string.h>

int cogbert_state_create(const cogbert_policy *P, size_t max_batch, cogbert_state **out) {
    cogbert_state *S;
    size_t per[11], total = 0, k, H;
    unsigned char *base;
    int of = 0;
    if (out)
        *out = NULL;
    if (!P || !out || max_batch == 0 || max_batch > ((size_t)1 << 24))
        return COGBERT_ERR_ARGUMENT;
    H = P->hidden;
    per[0] = per[1] = H * sizeof(float);                 /* h, c */
    per[2] = per[3] = P->max_width * sizeof(float);      /* xa, xb */
    per[4] = P->cat_w * sizeof(float);                   /* [x, h] */
    per[5] = 4 * H * sizeof(float);                      /* gates */
    per[6] = per[7] = (P->max_groups ? P->max_groups : 1) * sizeof(float); /* xs, xsum */
    per[8] = P->action_size * sizeof(float);             /* head */
    per[9] = sizeof(float);                              /* value */
    per[10] = (P->max_qcols ? P->max_qcols : 2) * sizeof(int16_t);
    for (k = 0; k < 11; k++)
        total += (cb_mul(per[k], max_batch, &of) + CB_ALIGN - 1) / CB_ALIGN * CB_ALIGN;
    if (of)
        return COGBERT_ERR_ARGUMENT;
    S = (cogbert_state *)cb_malloc(&P->alloc, sizeof *S);
    if (!S)
        return COGBERT_ERR_NO_MEMORY;
    memset(S, 0, sizeof *S);
    S->block = cb_malloc(&P->alloc, total);
    if (!S->block) {
        cb_free(&P->alloc, S);
        return COGBERT_ERR_NO_MEMORY;
    }
    memset(S->block, 0, total);
    base = (unsigned char *)S->block;
#define TAKE(field, type, i) \
    S->field = (type *)(void *)base; \
    base += (per[i] * max_batch + CB_ALIGN - 1) / CB_ALIGN * CB_ALIGN;
    TAKE(h, float, 0)
    TAKE(c, float, 1)
    TAKE(xa, float, 2)
    TAKE(xb, float, 3)
    TAKE(cat, float, 4)
    TAKE(gates, float, 5)
    TAKE(xs, float, 6)
    TAKE(xsum, float, 7)
    TAKE(head, float, 8)
    TAKE(value, float, 9)
    TAKE(xq, int16_t, 10)
#undef TAKE
    S->p = P;
    S->max_batch = max_batch;
    S->bytes = total + sizeof *S;
    *out = S;
    return COGBERT_OK;
}

void cogbert_state_destroy(cogbert_state *S) {
    const cogbert_policy *P;
    if (!S)
        return;
    P = S->p;
    cb_free(&P->alloc, S->block);
    cb_free(&P->alloc, S);
}

int cogbert_state_reset(cogbert_state *S) {
    if (!S)
        return COGBERT_ERR_ARGUMENT;
    memset(S->h, 0, S->max_batch * S->p->hidden * sizeof(float));
    memset(S->c, 0, S->max_batch * S->p->hidden * sizeof(float));
    return COGBERT_OK;
}

int cogbert_state_reset_row(cogbert_state *S, size_t row) {
    if (!S || row >= S->max_batch)
        return COGBERT_ERR_ARGUMENT;
    memset(S->h + row * S->p->hidden, 0, S->p->hidden * sizeof(float));
    memset(S->c + row * S->p->hidden, 0, S->p->hidden * sizeof(float));
    return COGBERT_OK;
}

int cogbert_state_copy(cogbert_state *dst, const cogbert_state *src) {
    if (!dst || !src || dst->p != src->p || dst->max_batch < src->max_batch)
        return COGBERT_ERR_ARGUMENT;
    if (dst != src) {
        memcpy(dst->h, src->h, src->max_batch * src->p->hidden * sizeof(float));
        memcpy(dst->c, src->c, src->max_batch * src->p->hidden * sizeof(float));
    }
    return COGBERT_OK;
}

int cogbert_state_get(const cogbert_state *S, size_t rows, float *h, float *c) {
    if (!S || rows == 0 || rows > S->max_batch)
        return COGBERT_ERR_ARGUMENT;
    if (h)
        memcpy(h, S->h, rows * S->p->hidden * sizeof(float));
    if (c)
        memcpy(c, S->c, rows * S->p->hidden * sizeof(float));
    return COGBERT_OK;
}

int cogbert_state_set(cogbert_state *S, size_t rows, const float *h, const float *c) {
    if (!S || rows == 0 || rows > S->max_batch)
        return COGBERT_ERR_ARGUMENT;
    if (h)
        memcpy(S->h, h, rows * S->p->hidden * sizeof(float));
    if (c)
        memcpy(S->c, c, rows * S->p->hidden * sizeof(float));
    return COGBERT_OK;
}

size_t cogbert_state_max_batch(const cogbert_state *S) {
    return S ? S->max_batch : 0;
}
