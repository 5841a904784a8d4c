/* NEON kernels (arm64, and 32-bit ARM with NEON). Same layouts and the same arithmetic order as
 * the scalar and AVX2 kernels: a panel of 8 rows is two float32x4 registers. Activation
 * quantization and the LSTM cell use the portable scalar code, which is a small share of a step.
 *
 * Kept deliberately simple (one row at a time): it cannot be run on the x86 development and CI
 * machines, so it is compiled there for syntax only (`make -C native neon-check`) and its
 * correctness rests on the scalar-vs-kernel parity tests run on an ARM machine.
 */
#include "internal.h"

#if defined(__ARM_NEON) || defined(__ARM_NEON__)
#include <arm_neon.h>
#include <string.h>

#if defined(__aarch64__) || defined(__ARM_FEATURE_FMA)
#define FMA4(acc, a, b) vfmaq_f32(acc, a, b)
#else /* ARMv7 without VFPv4: multiply, then add */
#define FMA4(acc, a, b) vmlaq_f32(acc, a, b)
#endif

static size_t rows_in(const cb_layer *L, size_t p) {
    size_t r = L->rows - p * CB_PANEL;
    return r > CB_PANEL ? CB_PANEL : r;
}

static void init_acc(const cb_layer *L, size_t p, const float *y, int acc, float32x4_t *lo, float32x4_t *hi) {
    float t[CB_PANEL] = {0};
    size_t k, n = rows_in(L, p);
    if (acc)
        for (k = 0; k < n; k++)
            t[k] = y[p * CB_PANEL + k];
    *lo = vld1q_f32(t);
    *hi = vld1q_f32(t + 4);
    if (L->bias) {
        *lo = vaddq_f32(*lo, vld1q_f32(L->bias + p * CB_PANEL));
        *hi = vaddq_f32(*hi, vld1q_f32(L->bias + p * CB_PANEL + 4));
    }
}

static void store(const cb_layer *L, size_t p, float *y, float32x4_t lo, float32x4_t hi) {
    float t[CB_PANEL];
    size_t k, n = rows_in(L, p);
    vst1q_f32(t, lo);
    vst1q_f32(t + 4, hi);
    for (k = 0; k < n; k++)
        y[p * CB_PANEL + k] = t[k];
}

static void linear_f32(const cb_layer *L, size_t B, const float *x, size_t ldx, float *y, size_t ldy, int acc) {
    size_t b, p, j;
    for (b = 0; b < B; b++) {
        const float *xb = x + b * ldx;
        float *yb = y + b * ldy;
        for (p = 0; p < L->panels; p++) {
            const float *w = L->w + p * L->cols * CB_PANEL;
            float32x4_t lo, hi;
            init_acc(L, p, yb, acc, &lo, &hi);
            for (j = 0; j < L->cols; j++) {
                const float32x4_t xv = vdupq_n_f32(xb[j]);
                lo = FMA4(lo, vld1q_f32(w + j * CB_PANEL), xv);
                hi = FMA4(hi, vld1q_f32(w + j * CB_PANEL + 4), xv);
            }
            store(L, p, yb, lo, hi);
        }
    }
}

static void linear_q(const cb_layer *L, size_t B, const int16_t *xq, size_t ldq, const float *xs,
                     const float *xsum, size_t ldg, float *y, size_t ldy, int acc) {
    size_t b, p, g, t;
    const size_t half = L->group / 2;
    for (b = 0; b < B; b++) {
        const int16_t *qb = xq + b * ldq;
        float *yb = y + b * ldy;
        for (p = 0; p < L->panels; p++) {
            const uint8_t *w = L->q + p * L->cols * CB_PANEL;
            float32x4_t lo, hi;
            init_acc(L, p, yb, acc, &lo, &hi);
            for (g = 0; g < L->groups; g++) {
                /* 16 bytes = rows 0..7 x inputs (2jp, 2jp+1); products land per row pair. */
                int32x4_t a01 = vdupq_n_s32(0), a23 = a01, a45 = a01, a67 = a01;
                const size_t at = (p * L->groups + g) * CB_PANEL;
                float32x4_t s_lo, s_hi;
                for (t = 0; t < half; t++) {
                    const size_t jp = g * half + t;
                    const uint8x16_t raw = vld1q_u8(w + jp * 2 * CB_PANEL);
                    const int16x8_t w03 = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(raw)));
                    const int16x8_t w47 = vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(raw)));
                    int16x4_t xv;
                    int32_t pair;
                    memcpy(&pair, qb + 2 * jp, sizeof pair);
                    xv = vreinterpret_s16_s32(vdup_n_s32(pair));
                    a01 = vmlal_s16(a01, vget_low_s16(w03), xv);
                    a23 = vmlal_s16(a23, vget_high_s16(w03), xv);
                    a45 = vmlal_s16(a45, vget_low_s16(w47), xv);
                    a67 = vmlal_s16(a67, vget_high_s16(w47), xv);
                }
                {
                    /* [r0 j, r0 j+1, r1 j, r1 j+1] -> per-row sums. */
                    const int32x4_t d_lo = vcombine_s32(vpadd_s32(vget_low_s32(a01), vget_high_s32(a01)),
                                                        vpadd_s32(vget_low_s32(a23), vget_high_s32(a23)));
                    const int32x4_t d_hi = vcombine_s32(vpadd_s32(vget_low_s32(a45), vget_high_s32(a45)),
                                                        vpadd_s32(vget_low_s32(a67), vget_high_s32(a67)));
                    const float32x4_t sx = vdupq_n_f32(xs[b * ldg + g]), sm = vdupq_n_f32(xsum[b * ldg + g]);
                    s_lo = vmulq_f32(vld1q_f32(L->scale + at), sx);
                    s_hi = vmulq_f32(vld1q_f32(L->scale + at + 4), sx);
                    lo = FMA4(lo, vcvtq_f32_s32(d_lo), s_lo);
                    hi = FMA4(hi, vcvtq_f32_s32(d_hi), s_hi);
                    lo = FMA4(lo, vld1q_f32(L->qbias + at), sm);
                    hi = FMA4(hi, vld1q_f32(L->qbias + at + 4), sm);
                }
            }
            store(L, p, yb, lo, hi);
        }
    }
}

void cb_scalar_quantize(size_t B, size_t cols, size_t group, const float *x, size_t ldx, int16_t *xq, size_t ldq,
                        float *xs, float *xsum, size_t ldg);
void cb_scalar_cell(size_t B, size_t H, const float *gates, size_t ldg, const float *c_in, float *h_out, float *c_out);

const cb_kernels cb_neon_kernels = {COGBERT_KERNEL_NEON, linear_f32, linear_q, cb_scalar_quantize, cb_scalar_cell};

#else
const cb_kernels cb_neon_kernels = {0, NULL, NULL, NULL, NULL};
#endif
