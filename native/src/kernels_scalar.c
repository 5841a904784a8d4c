/* Portable kernels: plain C99 on the same packed layouts as the SIMD kernels (see internal.h).
 * They define the arithmetic the SIMD kernels reproduce: each output starts from the bias (or
 * the previous y when accumulating) and adds the products in input order; a quantized layer adds,
 * per group g, (scale * xs_g) * sum_j q_j xq_j + qbias * sum_j x_j. */
#include "internal.h"

#include <math.h>

static void linear_f32(const cb_layer *L, size_t B, const float *x, size_t ldx, float *y, size_t ldy, int acc) {
    size_t b, r, j;
    for (b = 0; b < B; b++) {
        const float *xb = x + b * ldx;
        float *yb = y + b * ldy;
        for (r = 0; r < L->rows; r++) {
            const size_t W = L->panel;
            const float *w = L->w + (r / W) * L->cols * W + r % W;
            float s = acc ? yb[r] : 0.0f;
            if (L->bias)
                s += L->bias[r];
            for (j = 0; j < L->cols; j++)
                s += w[j * W] * xb[j];
            yb[r] = s;
        }
    }
}

static void linear_q(const cb_layer *L, size_t B, const int16_t *xq, size_t ldq, const float *xs,
                     const float *xsum, size_t ldg, float *y, size_t ldy, int acc) {
    size_t b, r, g, j;
    for (b = 0; b < B; b++) {
        const int16_t *qb = xq + b * ldq;
        float *yb = y + b * ldy;
        for (r = 0; r < L->rows; r++) {
            const size_t W = L->panel, p = r / W, lane = r % W;
            const uint8_t *w = L->q + p * L->cols * W + lane * 4;
            float s = acc ? yb[r] : 0.0f;
            if (L->bias)
                s += L->bias[r];
            for (g = 0; g < L->groups; g++) {
                int32_t dot = 0;
                float sc = L->scale[(p * L->groups + g) * W + lane];
                float qb0 = L->qbias[(p * L->groups + g) * W + lane];
                for (j = g * L->group; j < (g + 1) * L->group; j++)
                    dot += (int32_t)w[(j / 4) * 4 * W + (j & 3)] * qb[CB_QPOS(j)];
                s += (sc * xs[b * ldg + g]) * (float)dot;
                s += qb0 * xsum[b * ldg + g];
            }
            yb[r] = s;
        }
    }
}

static void quantize_levels(size_t B, size_t cols, size_t group, const float *x, size_t ldx, int16_t *xq,
                            size_t ldq, float *xs, float *xsum, size_t ldg, float levels) {
    size_t b, g, j;
    for (b = 0; b < B; b++) {
        for (g = 0; g < cols / group; g++) {
            const float *v = x + b * ldx + g * group;
            int16_t *q = xq + b * ldq + g * group;
            float m = 0.0f, s = 0.0f, inv;
            for (j = 0; j < group; j++) {
                float a = fabsf(v[j]);
                m = a > m ? a : m;
                s += v[j];
            }
            inv = m > 0.0f ? levels / m : 0.0f;
            for (j = 0; j < group; j++) {
                float t = v[j] * inv;
                t = t > levels ? levels : t < -levels ? -levels : t;
                q[CB_QPOS(j)] = (int16_t)lrintf(t);
            }
            xs[b * ldg + g] = m / levels;
            xsum[b * ldg + g] = s;
        }
    }
}

static void quantize(size_t B, size_t cols, size_t group, const float *x, size_t ldx, int16_t *xq, size_t ldq,
                     float *xs, float *xsum, size_t ldg) {
    quantize_levels(B, cols, group, x, ldx, xq, ldq, xs, xsum, ldg, CB_ACT_LEVELS);
}

/* int8 activations (127 levels), as the VNNI kernels quantize them: a portable reference that
 * lets tests hold the VNNI kernels to a tight bound. */
static void quantize8(size_t B, size_t cols, size_t group, const float *x, size_t ldx, int16_t *xq, size_t ldq,
                      float *xs, float *xsum, size_t ldg) {
    quantize_levels(B, cols, group, x, ldx, xq, ldq, xs, xsum, ldg, 127.0f);
}

static float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

static void cell(size_t B, size_t H, const float *gates, size_t ldg, const float *c_in, float *h_out, float *c_out) {
    size_t b, k;
    for (b = 0; b < B; b++) {
        const float *z = gates + b * ldg;
        for (k = 0; k < H; k++) {
            float i = sigmoidf(z[k]), f = sigmoidf(z[H + k]), g = tanhf(z[2 * H + k]), o = sigmoidf(z[3 * H + k]);
            float c = f * c_in[b * H + k] + i * g;
            c_out[b * H + k] = c;
            h_out[b * H + k] = o * tanhf(c);
        }
    }
}

const cb_kernels cb_scalar_kernels = {COGBERT_KERNEL_SCALAR, CB_PANEL, linear_f32, linear_q, quantize, cell};
const cb_kernels cb_scalar8_kernels = {COGBERT_KERNEL_SCALAR_INT8, CB_PANEL, linear_f32, linear_q, quantize8, cell};

/* The NEON table borrows these; see kernels_neon.c. */
void cb_scalar_quantize(size_t B, size_t cols, size_t group, const float *x, size_t ldx, int16_t *xq, size_t ldq,
                        float *xs, float *xsum, size_t ldg) {
    quantize(B, cols, group, x, ldx, xq, ldq, xs, xsum, ldg);
}

void cb_scalar_cell(size_t B, size_t H, const float *gates, size_t ldg, const float *c_in, float *h_out, float *c_out) {
    cell(B, H, gates, ldg, c_in, h_out, c_out);
}
