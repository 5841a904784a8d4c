/* AVX2 + FMA kernels (x86-64). This file alone is compiled with -mavx2 -mfma; the library calls
 * into it only after cb_cpu_has_avx2_fma() said yes at open time, so one binary runs anywhere.
 *
 * Layouts (internal.h): 8 output rows per panel, so one register holds 8 outputs and no
 * horizontal sums are needed.
 *  - fp32: per input j, one broadcast of x[j] and one FMA per panel. 8 panels per block keep 8
 *    independent FMA chains in flight (FMA latency 4, two ports).
 *  - quantized: weights are unsigned 8-bit codes (int4 codes unpacked to bytes at open), four
 *    adjacent inputs per row, so 32 bytes = 8 rows x 4 inputs. A mask and a shift split them
 *    into int16 words (even and odd inputs), and two vpmaddwd against broadcast int16 pairs of
 *    activations give one int32 per row. No saturation anywhere: |q x| <= 255 * 32767 and a
 *    128-wide group sums to < 2^31. Per group, the int32 sums become floats with scale * xs and
 *    the quantization offsets add qbias * sum(x). Two multiply uops per 32 products, like the
 *    u8 x s8 vpmaddubsw route (which needs vpmaddwd to widen, and 7-bit activations or sign
 *    tricks to avoid saturating), while int16 activations keep the activation error near
 *    1.5e-5 of the group maximum instead of 0.4 %. Widening with vpmovzxbw instead was measured
 *    2x slower: it is bound to the shuffle port.
 * The batch kernels tile 4 rows x 2 panels to load and widen each weight once per 4 rows; every
 * output element sees the same operations in the same order as in the one-row kernels, so a
 * batch row equals the same row stepped alone, bit for bit.
 */
#include "internal.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#include <string.h>

static __m256 load_rows(const float *y, size_t n) {
    float t[CB_PANEL] = {0};
    size_t k;
    if (n >= CB_PANEL)
        return _mm256_loadu_ps(y);
    for (k = 0; k < n; k++)
        t[k] = y[k];
    return _mm256_loadu_ps(t);
}

static void store_rows(float *y, size_t n, __m256 v) {
    float t[CB_PANEL];
    size_t k;
    if (n >= CB_PANEL) {
        _mm256_storeu_ps(y, v);
        return;
    }
    _mm256_storeu_ps(t, v);
    for (k = 0; k < n; k++)
        y[k] = t[k];
}

static size_t rows_in(const cb_layer *L, size_t p) {
    size_t r = L->rows - p * CB_PANEL;
    return r > CB_PANEL ? CB_PANEL : r;
}

static __m256 init_acc(const cb_layer *L, size_t p, const float *y, int acc) {
    __m256 a = acc ? load_rows(y + p * CB_PANEL, rows_in(L, p)) : _mm256_setzero_ps();
    if (L->bias)
        a = _mm256_add_ps(a, _mm256_loadu_ps(L->bias + p * CB_PANEL));
    return a;
}

/* ---- fp32 -------------------------------------------------------------------------------- */

static void f32_row(const cb_layer *L, const float *x, float *y, int acc) {
    const size_t cols = L->cols, stride = cols * CB_PANEL;
    size_t p = 0, j, k;
    for (; p + 8 <= L->panels; p += 8) {
        __m256 a0 = init_acc(L, p, y, acc), a1 = init_acc(L, p + 1, y, acc), a2 = init_acc(L, p + 2, y, acc),
               a3 = init_acc(L, p + 3, y, acc), a4 = init_acc(L, p + 4, y, acc), a5 = init_acc(L, p + 5, y, acc),
               a6 = init_acc(L, p + 6, y, acc), a7 = init_acc(L, p + 7, y, acc);
        const float *w = L->w + p * stride;
        for (j = 0; j < cols; j++) {
            const __m256 xb = _mm256_broadcast_ss(x + j);
            const float *wj = w + j * CB_PANEL;
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wj), xb, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + stride), xb, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + 2 * stride), xb, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + 3 * stride), xb, a3);
            a4 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + 4 * stride), xb, a4);
            a5 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + 5 * stride), xb, a5);
            a6 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + 6 * stride), xb, a6);
            a7 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + 7 * stride), xb, a7);
        }
        store_rows(y + (p + 0) * CB_PANEL, rows_in(L, p + 0), a0);
        store_rows(y + (p + 1) * CB_PANEL, rows_in(L, p + 1), a1);
        store_rows(y + (p + 2) * CB_PANEL, rows_in(L, p + 2), a2);
        store_rows(y + (p + 3) * CB_PANEL, rows_in(L, p + 3), a3);
        store_rows(y + (p + 4) * CB_PANEL, rows_in(L, p + 4), a4);
        store_rows(y + (p + 5) * CB_PANEL, rows_in(L, p + 5), a5);
        store_rows(y + (p + 6) * CB_PANEL, rows_in(L, p + 6), a6);
        store_rows(y + (p + 7) * CB_PANEL, rows_in(L, p + 7), a7);
    }
    for (; p < L->panels; p++) {
        /* A lone panel is one dependent FMA chain; it only runs for small heads. */
        __m256 a = init_acc(L, p, y, acc);
        const float *w = L->w + p * stride;
        for (k = 0; k < cols; k++)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k * CB_PANEL), _mm256_broadcast_ss(x + k), a);
        store_rows(y + p * CB_PANEL, rows_in(L, p), a);
    }
}

void cb_avx2_linear_f32(const cb_layer *L, size_t B, const float *x, size_t ldx, float *y, size_t ldy, int acc) {
    const size_t cols = L->cols, stride = cols * CB_PANEL, B4 = B / 4 * 4;
    size_t b, p, j;
    /* Panel pairs outside, row tiles inside: the strip of weights is read from memory once and
     * from L1/L2 by the other tiles. */
    for (p = 0; p + 2 <= L->panels; p += 2) {
        const float *w = L->w + p * stride;
        for (b = 0; b < B4; b += 4) {
            const float *x0 = x + b * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
            float *y0 = y + b * ldy, *y1 = y0 + ldy, *y2 = y1 + ldy, *y3 = y2 + ldy;
            /* Written out so that the 8 accumulators live in registers. */
            __m256 a00 = init_acc(L, p, y0, acc), a01 = init_acc(L, p + 1, y0, acc), a10 = init_acc(L, p, y1, acc),
                   a11 = init_acc(L, p + 1, y1, acc), a20 = init_acc(L, p, y2, acc), a21 = init_acc(L, p + 1, y2, acc),
                   a30 = init_acc(L, p, y3, acc), a31 = init_acc(L, p + 1, y3, acc);
            for (j = 0; j < cols; j++) {
                const __m256 w0 = _mm256_loadu_ps(w + j * CB_PANEL), w1 = _mm256_loadu_ps(w + stride + j * CB_PANEL);
                __m256 xb = _mm256_broadcast_ss(x0 + j);
                a00 = _mm256_fmadd_ps(w0, xb, a00);
                a01 = _mm256_fmadd_ps(w1, xb, a01);
                xb = _mm256_broadcast_ss(x1 + j);
                a10 = _mm256_fmadd_ps(w0, xb, a10);
                a11 = _mm256_fmadd_ps(w1, xb, a11);
                xb = _mm256_broadcast_ss(x2 + j);
                a20 = _mm256_fmadd_ps(w0, xb, a20);
                a21 = _mm256_fmadd_ps(w1, xb, a21);
                xb = _mm256_broadcast_ss(x3 + j);
                a30 = _mm256_fmadd_ps(w0, xb, a30);
                a31 = _mm256_fmadd_ps(w1, xb, a31);
            }
            store_rows(y0 + p * CB_PANEL, rows_in(L, p), a00);
            store_rows(y0 + (p + 1) * CB_PANEL, rows_in(L, p + 1), a01);
            store_rows(y1 + p * CB_PANEL, rows_in(L, p), a10);
            store_rows(y1 + (p + 1) * CB_PANEL, rows_in(L, p + 1), a11);
            store_rows(y2 + p * CB_PANEL, rows_in(L, p), a20);
            store_rows(y2 + (p + 1) * CB_PANEL, rows_in(L, p + 1), a21);
            store_rows(y3 + p * CB_PANEL, rows_in(L, p), a30);
            store_rows(y3 + (p + 1) * CB_PANEL, rows_in(L, p + 1), a31);
        }
    }
    if (B4 && L->panels % 2) {
        p = L->panels - 1;
        for (b = 0; b < B4; b++) {
            __m256 a = init_acc(L, p, y + b * ldy, acc);
            const float *w = L->w + p * stride, *xb = x + b * ldx;
            for (j = 0; j < cols; j++)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(w + j * CB_PANEL), _mm256_broadcast_ss(xb + j), a);
            store_rows(y + b * ldy + p * CB_PANEL, rows_in(L, p), a);
        }
    }
    for (b = B4; b < B; b++)
        f32_row(L, x + b * ldx, y + b * ldy, acc);
}

/* ---- quantized ----------------------------------------------------------------------------- */

static __m256i bcast32(const int16_t *xq) {
    int32_t v;
    memcpy(&v, xq, sizeof v);
    return _mm256_set1_epi32(v);
}

/* 32 bytes = 8 rows x inputs j..j+3. As int16 words, the low bytes are inputs j, j+2 of each
 * row and the high bytes j+1, j+3; masking and shifting (ALU ops, no shuffle port) turns them
 * into two vectors vpmaddwd can take against the pairs (x_j, x_j+2) and (x_j+1, x_j+3). */
#define QUAD(acc, wptr, x02, x13)                                                                   \
    do {                                                                                           \
        const __m256i v_ = _mm256_loadu_si256((const __m256i *)(const void *)(wptr));              \
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(v_, lo8), x02), \
                                                     _mm256_madd_epi16(_mm256_srli_epi16(v_, 8), x13))); \
    } while (0)

static __m256 group_out(const cb_layer *L, size_t p, size_t g, __m256i dot, __m256 sx, __m256 sm, __m256 yv) {
    const size_t at = (p * L->groups + g) * CB_PANEL;
    yv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_loadu_ps(L->scale + at), sx), yv);
    return _mm256_fmadd_ps(_mm256_loadu_ps(L->qbias + at), sm, yv);
}

static void q_row(const cb_layer *L, const int16_t *xq, const float *xs, const float *xsum, float *y, int acc) {
    const __m256i lo8 = _mm256_set1_epi16(0x00FF);
    const size_t stride = L->cols * CB_PANEL, quads = L->group / 4;
    size_t p = 0, g, t;
    for (; p + 4 <= L->panels; p += 4) {
        __m256 y0 = init_acc(L, p, y, acc), y1 = init_acc(L, p + 1, y, acc), y2 = init_acc(L, p + 2, y, acc),
               y3 = init_acc(L, p + 3, y, acc);
        const uint8_t *w = L->q + p * stride;
        for (g = 0; g < L->groups; g++) {
            __m256i d0 = _mm256_setzero_si256(), d1 = d0, d2 = d0, d3 = d0;
            const __m256 sx = _mm256_set1_ps(xs[g]), sm = _mm256_set1_ps(xsum[g]);
            for (t = 0; t < quads; t++) {
                const size_t jq = g * quads + t;
                const __m256i x02 = bcast32(xq + 4 * jq), x13 = bcast32(xq + 4 * jq + 2);
                const uint8_t *wj = w + jq * 4 * CB_PANEL;
                QUAD(d0, wj, x02, x13);
                QUAD(d1, wj + stride, x02, x13);
                QUAD(d2, wj + 2 * stride, x02, x13);
                QUAD(d3, wj + 3 * stride, x02, x13);
            }
            y0 = group_out(L, p, g, d0, sx, sm, y0);
            y1 = group_out(L, p + 1, g, d1, sx, sm, y1);
            y2 = group_out(L, p + 2, g, d2, sx, sm, y2);
            y3 = group_out(L, p + 3, g, d3, sx, sm, y3);
        }
        store_rows(y + p * CB_PANEL, rows_in(L, p), y0);
        store_rows(y + (p + 1) * CB_PANEL, rows_in(L, p + 1), y1);
        store_rows(y + (p + 2) * CB_PANEL, rows_in(L, p + 2), y2);
        store_rows(y + (p + 3) * CB_PANEL, rows_in(L, p + 3), y3);
    }
    for (; p < L->panels; p++) {
        __m256 yv = init_acc(L, p, y, acc);
        const uint8_t *w = L->q + p * stride;
        for (g = 0; g < L->groups; g++) {
            __m256i d = _mm256_setzero_si256();
            for (t = 0; t < quads; t++) {
                const size_t jq = g * quads + t;
                QUAD(d, w + jq * 4 * CB_PANEL, bcast32(xq + 4 * jq), bcast32(xq + 4 * jq + 2));
            }
            yv = group_out(L, p, g, d, _mm256_set1_ps(xs[g]), _mm256_set1_ps(xsum[g]), yv);
        }
        store_rows(y + p * CB_PANEL, rows_in(L, p), yv);
    }
}

static void linear_q(const cb_layer *L, size_t B, const int16_t *xq, size_t ldq, const float *xs,
                     const float *xsum, size_t ldg, float *y, size_t ldy, int acc) {
    const __m256i lo8 = _mm256_set1_epi16(0x00FF);
    const size_t stride = L->cols * CB_PANEL, quads = L->group / 4, B4 = B / 4 * 4;
    size_t b, p, g, t, i;
    /* Panel pairs outside, row tiles inside: a 2-panel strip of weights stays in L1/L2 while
     * every row of the batch passes over it. */
    for (p = 0; p + 2 <= L->panels; p += 2) {
        const uint8_t *w = L->q + p * stride;
        for (b = 0; b < B4; b += 4) {
            __m256 yv[4][2];
            float *yb = y + b * ldy;
            for (i = 0; i < 4; i++) {
                yv[i][0] = init_acc(L, p, yb + i * ldy, acc);
                yv[i][1] = init_acc(L, p + 1, yb + i * ldy, acc);
            }
            for (g = 0; g < L->groups; g++) {
                /* Written out so that the 8 accumulators live in registers. */
                __m256i d00 = _mm256_setzero_si256(), d01 = d00, d10 = d00, d11 = d00, d20 = d00, d21 = d00, d30 = d00,
                        d31 = d00;
                const int16_t *x0 = xq + b * ldq, *x1 = x0 + ldq, *x2 = x1 + ldq, *x3 = x2 + ldq;
                for (t = 0; t < quads; t++) {
                    const size_t jq = g * quads + t;
                    const __m256i v0 = _mm256_loadu_si256((const __m256i *)(const void *)(w + jq * 4 * CB_PANEL));
                    const __m256i v1 = _mm256_loadu_si256((const __m256i *)(const void *)(w + stride + jq * 4 * CB_PANEL));
                    const __m256i e0 = _mm256_and_si256(v0, lo8), o0 = _mm256_srli_epi16(v0, 8);
                    const __m256i e1 = _mm256_and_si256(v1, lo8), o1 = _mm256_srli_epi16(v1, 8);
                    __m256i xa = bcast32(x0 + 4 * jq), xc = bcast32(x0 + 4 * jq + 2);
                    d00 = _mm256_add_epi32(d00, _mm256_add_epi32(_mm256_madd_epi16(e0, xa), _mm256_madd_epi16(o0, xc)));
                    d01 = _mm256_add_epi32(d01, _mm256_add_epi32(_mm256_madd_epi16(e1, xa), _mm256_madd_epi16(o1, xc)));
                    xa = bcast32(x1 + 4 * jq), xc = bcast32(x1 + 4 * jq + 2);
                    d10 = _mm256_add_epi32(d10, _mm256_add_epi32(_mm256_madd_epi16(e0, xa), _mm256_madd_epi16(o0, xc)));
                    d11 = _mm256_add_epi32(d11, _mm256_add_epi32(_mm256_madd_epi16(e1, xa), _mm256_madd_epi16(o1, xc)));
                    xa = bcast32(x2 + 4 * jq), xc = bcast32(x2 + 4 * jq + 2);
                    d20 = _mm256_add_epi32(d20, _mm256_add_epi32(_mm256_madd_epi16(e0, xa), _mm256_madd_epi16(o0, xc)));
                    d21 = _mm256_add_epi32(d21, _mm256_add_epi32(_mm256_madd_epi16(e1, xa), _mm256_madd_epi16(o1, xc)));
                    xa = bcast32(x3 + 4 * jq), xc = bcast32(x3 + 4 * jq + 2);
                    d30 = _mm256_add_epi32(d30, _mm256_add_epi32(_mm256_madd_epi16(e0, xa), _mm256_madd_epi16(o0, xc)));
                    d31 = _mm256_add_epi32(d31, _mm256_add_epi32(_mm256_madd_epi16(e1, xa), _mm256_madd_epi16(o1, xc)));
                }
                {
                    const __m256i d[4][2] = {{d00, d01}, {d10, d11}, {d20, d21}, {d30, d31}};
                    for (i = 0; i < 4; i++) {
                        const __m256 sx = _mm256_set1_ps(xs[(b + i) * ldg + g]), sm = _mm256_set1_ps(xsum[(b + i) * ldg + g]);
                        yv[i][0] = group_out(L, p, g, d[i][0], sx, sm, yv[i][0]);
                        yv[i][1] = group_out(L, p + 1, g, d[i][1], sx, sm, yv[i][1]);
                    }
                }
            }
            for (i = 0; i < 4; i++) {
                store_rows(yb + i * ldy + p * CB_PANEL, rows_in(L, p), yv[i][0]);
                store_rows(yb + i * ldy + (p + 1) * CB_PANEL, rows_in(L, p + 1), yv[i][1]);
            }
        }
    }
    if (B4) {
        /* Panels the pairs did not cover (an odd last one) for the tiled rows, through the
         * one-row kernel restricted to them: the same arithmetic per element. */
        const size_t done = L->panels / 2 * 2;
        if (done < L->panels) {
            cb_layer tail = *L;
            tail.panels = L->panels - done;
            tail.rows = L->rows - done * CB_PANEL;
            tail.q = L->q + done * stride;
            tail.scale = L->scale + done * L->groups * CB_PANEL;
            tail.qbias = L->qbias + done * L->groups * CB_PANEL;
            tail.bias = L->bias ? L->bias + done * CB_PANEL : NULL;
            for (b = 0; b < B4; b++)
                q_row(&tail, xq + b * ldq, xs + b * ldg, xsum + b * ldg, y + b * ldy + done * CB_PANEL, acc);
        }
    }
    for (b = B4; b < B; b++)
        q_row(L, xq + b * ldq, xs + b * ldg, xsum + b * ldg, y + b * ldy, acc);
}

static float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

void cb_avx2_quantize(size_t B, size_t cols, size_t group, const float *x, size_t ldx, int16_t *xq, size_t ldq,
                     float *xs, float *xsum, size_t ldg) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 hi = _mm256_set1_ps(CB_ACT_LEVELS), lo = _mm256_set1_ps(-CB_ACT_LEVELS);
    size_t b, g, j;
    for (b = 0; b < B; b++) {
        for (g = 0; g < cols / group; g++) {
            const float *v = x + b * ldx + g * group;
            int16_t *q = xq + b * ldq + g * group;
            __m256 mx = _mm256_setzero_ps(), sm = _mm256_setzero_ps(), inv;
            float m;
            for (j = 0; j < group; j += 8) {
                const __m256 a = _mm256_loadu_ps(v + j);
                mx = _mm256_max_ps(mx, _mm256_and_ps(a, absmask));
                sm = _mm256_add_ps(sm, a);
            }
            m = hmax8(mx);
            inv = _mm256_set1_ps(m > 0.0f ? CB_ACT_LEVELS / m : 0.0f);
            for (j = 0; j < group; j += 16) {
                __m256 a = _mm256_mul_ps(_mm256_loadu_ps(v + j), inv), c = _mm256_mul_ps(_mm256_loadu_ps(v + j + 8), inv);
                __m256i packed;
                a = _mm256_min_ps(_mm256_max_ps(a, lo), hi);
                c = _mm256_min_ps(_mm256_max_ps(c, lo), hi);
                packed = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(c));
                /* packs interleaves 128-bit lanes: put the 16 values back in order, then each quad
                 * in the (x0, x2, x1, x3) order the kernels read. */
                packed = _mm256_permute4x64_epi64(packed, 0xD8);
                packed = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(packed, 0xD8), 0xD8);
                _mm256_storeu_si256((__m256i *)(void *)(q + j), packed);
            }
            xs[b * ldg + g] = m / CB_ACT_LEVELS;
            xsum[b * ldg + g] = hsum8(sm);
        }
    }
}

/* exp with Cephes' range reduction and polynomial: about 1 ulp on [-87, 88]. Inputs are clamped
 * there, so sigmoid and tanh saturate instead of producing inf/NaN. */
static inline __m256 exp8(__m256 x) {
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(
        x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f)),
        _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x), p;
    __m256i e;
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 sigmoid8(__m256 v) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}

/* tanh(v) = 2 sigmoid(2v) - 1: absolute error about 1e-7, which is what the state needs. */
static inline __m256 tanh8(__m256 v) {
    const __m256 two = _mm256_set1_ps(2.0f);
    return _mm256_sub_ps(_mm256_mul_ps(two, sigmoid8(_mm256_mul_ps(two, v))), _mm256_set1_ps(1.0f));
}

void cb_avx2_cell(size_t B, size_t H, const float *gates, size_t ldg, const float *c_in, float *h_out, float *c_out) {
    size_t b, k, r;
    for (b = 0; b < B; b++) {
        const float *z = gates + b * ldg;
        for (k = 0; k < H; k += 8) {
            /* A short tail goes through a padded copy so every element gets the same math. */
            float t[5][CB_PANEL] = {{0}};
            const size_t n = H - k < 8 ? H - k : 8;
            const float *zi = z + k, *zf = z + H + k, *zg = z + 2 * H + k, *zo = z + 3 * H + k, *cp = c_in + b * H + k;
            __m256 i, f, g, o, c;
            if (n < 8) {
                for (r = 0; r < n; r++) {
                    t[0][r] = zi[r]; t[1][r] = zf[r]; t[2][r] = zg[r]; t[3][r] = zo[r]; t[4][r] = cp[r];
                }
                zi = t[0]; zf = t[1]; zg = t[2]; zo = t[3]; cp = t[4];
            }
            i = sigmoid8(_mm256_loadu_ps(zi));
            f = sigmoid8(_mm256_loadu_ps(zf));
            g = tanh8(_mm256_loadu_ps(zg));
            o = sigmoid8(_mm256_loadu_ps(zo));
            c = _mm256_fmadd_ps(f, _mm256_loadu_ps(cp), _mm256_mul_ps(i, g));
            if (n == 8) {
                _mm256_storeu_ps(c_out + b * H + k, c);
                _mm256_storeu_ps(h_out + b * H + k, _mm256_mul_ps(o, tanh8(c)));
            } else {
                float hc[2][CB_PANEL];
                _mm256_storeu_ps(hc[0], c);
                _mm256_storeu_ps(hc[1], _mm256_mul_ps(o, tanh8(c)));
                for (r = 0; r < n; r++) {
                    c_out[b * H + k + r] = hc[0][r];
                    h_out[b * H + k + r] = hc[1][r];
                }
            }
        }
    }
}

const cb_kernels cb_avx2_kernels = {COGBERT_KERNEL_AVX2, CB_PANEL, cb_avx2_linear_f32, linear_q, cb_avx2_quantize, cb_avx2_cell};

#else
const cb_kernels cb_avx2_kernels = {0, CB_PANEL, NULL, NULL, NULL, NULL};
#endif
