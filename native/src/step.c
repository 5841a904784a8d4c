/* The decision path: the step for a batch (normalise, encoder, LSTM, heads) on the policy's
 * kernels, and the one-call discrete decision. Never allocates, never locks. */
#include "internal.h"

#include <string.h>

static void apply(const cogbert_policy *P, cogbert_state *S, const cb_layer *L, size_t B, const float *x, size_t ldx,
                  float *y, size_t ldy, int acc) {
    if (L->kind == CB_L_F32) {
        P->k.linear_f32(L, B, x, ldx, y, ldy, acc);
    } else {
        const size_t ldq = P->max_qcols, ldg = P->max_groups;
        P->k.quantize(B, L->cols, L->group, x, ldx, S->xq, ldq, S->xs, S->xsum, ldg);
        P->k.linear_q(L, B, S->xq, ldq, S->xs, S->xsum, ldg, y, ldy, acc);
    }
}

static int forward(const cogbert_policy *P, cogbert_state *S, size_t B, const float *obs, const float *h_in,
                   const float *c_in, float *head, float *value, float *h_out, float *c_out) {
    const size_t D = P->obs_dim, H = P->hidden, W = P->max_width, CW = P->cat_w;
    float *x = P->n_enc ? S->xa : S->cat;
    size_t ldx = P->n_enc ? W : CW, b, k, i;
    if (!cb_all_finite(obs, B * D))
        return COGBERT_ERR_NONFINITE;
    for (b = 0; b < B; b++) {
        const float *o = obs + b * D;
        float *xb = x + b * ldx;
        for (k = 0; k < D; k++) {
            float v = (o[k] - P->mean[k]) / P->std[k];
            if (P->clip > 0.0f)
                v = v < -P->clip ? -P->clip : v > P->clip ? P->clip : v;
            xb[k] = v;
        }
    }
    for (i = 0; i < P->n_enc; i++) {
        const cb_layer *L = &P->enc[i];
        const int last = i + 1 == P->n_enc;
        float *y = last ? S->cat : (x == S->xa ? S->xb : S->xa);
        const size_t ldy = last ? CW : W;
        apply(P, S, L, B, x, ldx, y, ldy, 0);
        for (b = 0; b < B; b++)
            for (k = 0; k < L->rows; k++)
                y[b * ldy + k] = y[b * ldy + k] > 0.0f ? y[b * ldy + k] : 0.0f;
        x = y;
        ldx = ldy;
    }
    for (b = 0; b < B; b++)
        memcpy(S->cat + b * CW + P->lstm_in, h_in + b * H, H * sizeof(float));
    if (P->fused) {
        apply(P, S, &P->lstm, B, S->cat, CW, S->gates, 4 * H, 0);
    } else {
        apply(P, S, &P->lstm, B, S->cat, CW, S->gates, 4 * H, 0);
        apply(P, S, &P->lstm_hh, B, S->cat + P->lstm_in, CW, S->gates, 4 * H, 1);
    }
    P->k.cell(B, H, S->gates, 4 * H, c_in, h_out, c_out);
    apply(P, S, &P->policy, B, h_out, H, head ? head : S->head, P->action_size, 0);
    apply(P, S, &P->value, B, h_out, H, value ? value : S->value, 1, 0);
    return COGBERT_OK;
}

int cogbert_forward(const cogbert_policy *P, cogbert_state *ws, size_t batch, const float *obs, const float *h_in,
                    const float *c_in, float *head, float *value, float *h_out, float *c_out) {
    if (!P || !ws || ws->p != P || batch == 0 || batch > ws->max_batch || !obs || !h_in || !c_in || !h_out || !c_out)
        return COGBERT_ERR_ARGUMENT;
    return forward(P, ws, batch, obs, h_in, c_in, head, value, h_out, c_out);
}

int cogbert_step_batch(const cogbert_policy *P, cogbert_state *S, size_t batch, const float *obs, float *head,
                       float *value) {
    if (!P || !S || S->p != P || batch == 0 || batch > S->max_batch || !obs)
        return COGBERT_ERR_ARGUMENT;
    return forward(P, S, batch, obs, S->h, S->c, head, value, S->h, S->c);
}

int cogbert_step(const cogbert_policy *P, cogbert_state *S, const float *obs, float *head, float *value) {
    return cogbert_step_batch(P, S, 1, obs, head, value);
}

int cogbert_decide(const cogbert_policy *P, cogbert_state *S, const float *obs, double u, int deterministic,
                   int32_t *action, double *log_prob, float *value) {
    int32_t a;
    int rc;
    if (!P || !S || S->p != P || !obs)
        return COGBERT_ERR_ARGUMENT;
    if (P->continuous)
        return COGBERT_ERR_UNSUPPORTED;
    rc = forward(P, S, 1, obs, S->h, S->c, S->head, S->value, S->h, S->c);
    if (rc != COGBERT_OK)
        return rc;
    if (deterministic) {
        rc = cogbert_argmax(S->head, P->action_size, &a);
        if (log_prob)
            *log_prob = 0.0;
    } else {
        rc = cogbert_sample(S->head, P->action_size, u, &a, log_prob);
    }
    if (rc == COGBERT_OK) {
        if (action)
            *action = a;
        if (value)
            *value = S->value[0];
    }
    return rc;
}
