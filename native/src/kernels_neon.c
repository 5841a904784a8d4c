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
    const size_t quads = L->group / 4;
    for (b = 0; b < B; b++) {
        const int16_t *qb = xq + b * ldq;
        float *yb = y + b * ldy;
        for (p = 0; p < L->panels; p++) {
            const uint8_t *w = L->q + p * L->cols * CB_PANEL;
            float32x4_t lo, hi;
            init_acc(L, p, yb, acc, &lo, &hi);
            for (g = 0; g < L->groups; g++) {
                /* 32 bytes = rows 0..7 x inputs j..j+3. As uint16 lanes, the low bytes are inputs
                 * j, j+2 of a row and the high bytes j+1, j+3 (as in the AVX2 kernel); they meet
                 * the activation pairs (x_j, x_j+2) and (x_j+1, x_j+3) stored side by side. */
                int32x4_t a01 = vdupq_n_s32(0), a23 = a01, a45 = a01, a67 = a01;
                const size_t at = (p * L->groups + g) * CB_PANEL;
                const uint16x8_t lo8 = vdupq_n_u16(0x00FF);
                float32x4_t s_lo, s_hi;
                for (t = 0; t < quads; t++) {
                    const size_t jq = g * quads + t;
                    const uint8_t *wj = w + jq * 4 * CB_PANEL;
                    const uint16x8_t r03 = vreinterpretq_u16_u8(vld1q_u8(wj)), r47 = vreinterpretq_u16_u8(vld1q_u8(wj + 16));
                    const int16x8_t e03 = vreinterpretq_s16_u16(vandq_u16(r03, lo8)), o03 = vreinterpretq_s16_u16(vshrq_n_u16(r03, 8));
                    const int16x8_t e47 = vreinterpretq_s16_u16(vandq_u16(r47, lo8)), o47 = vreinterpretq_s16_u16(vshrq_n_u16(r47, 8));
                    const int32x2_t pairs = vreinterpret_s32_s16(vld1_s16(qb + 4 * jq)); /* (x0,x2),(x1,x3) */
                    const int16x4_t x02 = vreinterpret_s16_s32(vdup_lane_s32(pairs, 0));
                    const int16x4_t x13 = vreinterpret_s16_s32(vdup_lane_s32(pairs, 1));
                    a01 = vmlal_s16(vmlal_s16(a01, vget_low_s16(e03), x02), vget_low_s16(o03), x13);
                    a23 = vmlal_s16(vmlal_s16(a23, vget_high_s16(e03), x02), vget_high_s16(o03), x13);
                    a45 = vmlal_s16(vmlal_s16(a45, vget_low_s16(e47), x02), vget_low_s16(o47), x13);
                    a67 = vmlal_s16(vmlal_s16(a67, vget_high_s16(e47), x02), vget_high_s16(o47), x13);
                }
                {
                    /* [r0, r0, r1, r1] partial sums -> per-row sums. */
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

const cb_kernels cb_neon_kernels = {COGBERT_KERNEL_NEON, CB_PANEL, linear_f32, linear_q, cb_scalar_quantize, cb_scalar_cell};

#else
const cb_kernels cb_neon_kernels = {0, CB_PANEL, NULL, NULL, NULL, NULL};
#endif
