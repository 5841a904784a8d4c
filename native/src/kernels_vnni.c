/* AVX-512 VNNI kernels for quantized layers (256-bit registers, AVX512VL), chosen at run time
 * on CPUs that have them (Intel Ice Lake and later servers, AMD Zen 4 and later). fp32 layers
 * and the LSTM cell use the AVX2 kernels.
 *
 * vpdpbusd multiplies 32 unsigned bytes by 32 signed bytes and adds each group of 4 products
 * into an int32 lane, in one uop. The weight layout (8 rows x 4 adjacent inputs per 32 bytes,
 * internal.h) is exactly its operand layout, so one instruction does 32 multiply-adds where the
 * AVX2 kernel needs two vpmaddwd (plus masks and adds): on the test machine the LSTM product
 * goes from about 10 to about 5 microseconds. The price is int8 activations (127 levels per
 * group of inputs, error up to 0.4 % of the group's largest value) instead of int16; the parity
 * tests hold this kernel to its own, stated bound (tests/test_native.py).
 * Exact integer arithmetic: a group of 128 inputs sums to at most 128 * 255 * 127 < 2^23.
 */
#include "internal.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(COGBERT_HAVE_VNNI)
#include <immintrin.h>
#include <string.h>

#define ACT8 127.0f

static size_t rows_in(const cb_layer *L, size_t p) {
    size_t r = L->rows - p * CB_PANEL;
    return r > CB_PANEL ? CB_PANEL : r;
}

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

static __m256 init_acc(const cb_layer *L, size_t p, const float *y, int acc) {
    __m256 a = acc ? load_rows(y + p * CB_PANEL, rows_in(L, p)) : _mm256_setzero_ps();
    if (L->bias)
        a = _mm256_add_ps(a, _mm256_loadu_ps(L->bias + p * CB_PANEL));
    return a;
}

static __m256i bcast32(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, sizeof v);
    return _mm256_set1_epi32(v);
}

static __m256i wload(const uint8_t *w) {
    return _mm256_loadu_si256((const __m256i *)(const void *)w);
}

static __m256 group_out(const cb_layer *L, size_t p, size_t g, __m256i dot, __m256 sx, __m256 sm, __m256 yv) {
    const size_t at = (p * L->groups + g) * CB_PANEL;
    yv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_loadu_ps(L->scale + at), sx), yv);
    return _mm256_fmadd_ps(_mm256_loadu_ps(L->qbias + at), sm, yv);
}

static void q_row(const cb_layer *L, const int8_t *xq, const float *xs, const float *xsum, float *y, int acc) {
    const size_t stride = L->cols * CB_PANEL, quads = L->group / 4;
    size_t p = 0, g, t;
    for (; p + 4 <= L->panels; p += 4) {
        __m256 y0 = init_acc(L, p, y, acc), y1 = init_acc(L, p + 1, y, acc), y2 = init_acc(L, p + 2, y, acc),
               y3 = init_acc(L, p + 3, y, acc);
        const uint8_t *w = L->q + p * stride;
        for (g = 0; g < L->groups; g++) {
            /* Two accumulators per panel (even and odd quads): vpdpbusd's latency is 4-5
             * cycles, so 8 independent chains keep it issuing every cycle. Integer sums are
             * exact, so splitting them changes no result. quads is even (group 32, 64, 128). */
            __m256i d0 = _mm256_setzero_si256(), d1 = d0, d2 = d0, d3 = d0, e0 = d0, e1 = d0, e2 = d0, e3 = d0;
            const __m256 sx = _mm256_set1_ps(xs[g]), sm = _mm256_set1_ps(xsum[g]);
            for (t = 0; t < quads; t += 2) {
                const size_t jq = g * quads + t;
                const __m256i xb = bcast32(xq + 4 * jq), xc = bcast32(xq + 4 * jq + 4);
                const uint8_t *wj = w + jq * 4 * CB_PANEL, *wk = wj + 4 * CB_PANEL;
                d0 = _mm256_dpbusd_epi32(d0, wload(wj), xb);
                d1 = _mm256_dpbusd_epi32(d1, wload(wj + stride), xb);
                d2 = _mm256_dpbusd_epi32(d2, wload(wj + 2 * stride), xb);
                d3 = _mm256_dpbusd_epi32(d3, wload(wj + 3 * stride), xb);
                e0 = _mm256_dpbusd_epi32(e0, wload(wk), xc);
                e1 = _mm256_dpbusd_epi32(e1, wload(wk + stride), xc);
                e2 = _mm256_dpbusd_epi32(e2, wload(wk + 2 * stride), xc);
                e3 = _mm256_dpbusd_epi32(e3, wload(wk + 3 * stride), xc);
            }
            d0 = _mm256_add_epi32(d0, e0);
            d1 = _mm256_add_epi32(d1, e1);
            d2 = _mm256_add_epi32(d2, e2);
            d3 = _mm256_add_epi32(d3, e3);
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
                d = _mm256_dpbusd_epi32(d, wload(w + jq * 4 * CB_PANEL), bcast32(xq + 4 * jq));
            }
            yv = group_out(L, p, g, d, _mm256_set1_ps(xs[g]), _mm256_set1_ps(xsum[g]), yv);
        }
        store_rows(y + p * CB_PANEL, rows_in(L, p), yv);
    }
}

static void linear_q(const cb_layer *L, size_t B, const int16_t *xq16, size_t ldq, const float *xs,
                     const float *xsum, size_t ldg, float *y, size_t ldy, int acc) {
    /* The activation buffer holds int8 here (see quantize below); ldq counts int16 slots. */
    const int8_t *xq = (const int8_t *)(const void *)xq16;
    const size_t ld8 = 2 * ldq, stride = L->cols * CB_PANEL, quads = L->group / 4, B4 = B / 4 * 4;
    size_t b, p, g, t, i;
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
                const int8_t *x0 = xq + b * ld8, *x1 = x0 + ld8, *x2 = x1 + ld8, *x3 = x2 + ld8;
                for (t = 0; t < quads; t++) {
                    const size_t jq = g * quads + t;
                    const __m256i w0 = wload(w + jq * 4 * CB_PANEL), w1 = wload(w + stride + jq * 4 * CB_PANEL);
                    __m256i xb = bcast32(x0 + 4 * jq);
                    d00 = _mm256_dpbusd_epi32(d00, w0, xb);
                    d01 = _mm256_dpbusd_epi32(d01, w1, xb);
                    xb = bcast32(x1 + 4 * jq);
                    d10 = _mm256_dpbusd_epi32(d10, w0, xb);
                    d11 = _mm256_dpbusd_epi32(d11, w1, xb);
                    xb = bcast32(x2 + 4 * jq);
                    d20 = _mm256_dpbusd_epi32(d20, w0, xb);
                    d21 = _mm256_dpbusd_epi32(d21, w1, xb);
                    xb = bcast32(x3 + 4 * jq);
                    d30 = _mm256_dpbusd_epi32(d30, w0, xb);
                    d31 = _mm256_dpbusd_epi32(d31, w1, xb);
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
    if (B4 && L->panels % 2) {
        const size_t done = L->panels - 1;
        cb_layer tail = *L;
        tail.panels = 1;
        tail.rows = L->rows - done * CB_PANEL;
        tail.q = L->q + done * stride;
        tail.scale = L->scale + done * L->groups * CB_PANEL;
        tail.qbias = L->qbias + done * L->groups * CB_PANEL;
        tail.bias = L->bias ? L->bias + done * CB_PANEL : NULL;
        for (b = 0; b < B4; b++)
            q_row(&tail, xq + b * ld8, xs + b * ldg, xsum + b * ldg, y + b * ldy + done * CB_PANEL, acc);
    }
    for (b = B4; b < B; b++)
        q_row(L, xq + b * ld8, xs + b * ldg, xsum + b * ldg, y + b * ldy, acc);
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

/* int8 activations in natural order; xs = max|x| / 127. */
void cb_vnni_quantize(size_t B, size_t cols, size_t group, const float *x, size_t ldx, int16_t *xq16, size_t ldq,
                     float *xs, float *xsum, size_t ldg) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 hi = _mm256_set1_ps(ACT8), lo = _mm256_set1_ps(-ACT8);
    size_t b, g, j;
    for (b = 0; b < B; b++) {
        int8_t *row = (int8_t *)(void *)(xq16 + b * ldq);
        for (g = 0; g < cols / group; g++) {
            const float *v = x + b * ldx + g * group;
            int8_t *q = row + g * group;
            __m256 mx = _mm256_setzero_ps(), sm = _mm256_setzero_ps(), inv;
            float m;
            for (j = 0; j < group; j += 8) {
                const __m256 a = _mm256_loadu_ps(v + j);
                mx = _mm256_max_ps(mx, _mm256_and_ps(a, absmask));
                sm = _mm256_add_ps(sm, a);
            }
            m = hmax8(mx);
            inv = _mm256_set1_ps(m > 0.0f ? ACT8 / m : 0.0f);
            for (j = 0; j < group; j += 32) {
                __m256i r[4], w16a, w16b, w8;
                size_t k;
                for (k = 0; k < 4; k++) {
                    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(v + j + 8 * k), inv);
                    a = _mm256_min_ps(_mm256_max_ps(a, lo), hi);
                    r[k] = _mm256_cvtps_epi32(a);
                }
                /* packs works within 128-bit lanes; one permute restores the order. */
                w16a = _mm256_packs_epi32(r[0], r[1]);
                w16b = _mm256_packs_epi32(r[2], r[3]);
                w8 = _mm256_packs_epi16(w16a, w16b);
                w8 = _mm256_permutevar8x32_epi32(w8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256((__m256i *)(void *)(q + j), w8);
            }
            xs[b * ldg + g] = m / ACT8;
            xsum[b * ldg + g] = hsum8(sm);
        }
    }
}

const cb_kernels cb_vnni_kernels = {COGBERT_KERNEL_VNNI, CB_PANEL, cb_avx2_linear_f32, linear_q, cb_vnni_quantize, cb_avx2_cell};

#else
const cb_kernels cb_vnni_kernels = {0, CB_PANEL, NULL, NULL, NULL, NULL};
#endif
