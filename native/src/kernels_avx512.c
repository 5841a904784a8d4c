/* AVX-512 kernels (x86-64): fp32 layers with 512-bit FMAs, quantized layers either with int16
 * activations and 512-bit vpmaddwd (table AVX512, AVX512F+BW) or with int8 activations and
 * 512-bit vpdpbusd (table VNNI512, + AVX512-VNNI). This file alone is compiled with AVX-512
 * flags; the library calls into it only after dispatch.c's CPU check, so one binary runs anywhere.
 *
 * Layout: panels of 16 output rows (one zmm of fp32 lanes), chosen for these tables when the
 * policy opens (policy.c repacks for the table's panel width). A quantized quad step is then one
 * 64-byte load = 16 rows x 4 adjacent inputs, exactly vpdpbusd's operand.
 *
 * Batches: register-blocked over the batch. A tile is R batch rows x P panels of accumulators
 * (R = 4, P = 4 for fp32 and int8: 16 zmm; P = 2 for the int16 path, which needs two widened
 * weight registers per panel); each weight vector is loaded once per tile and used by R rows, and
 * panel blocks are the outer loop so the strip of weights a block reads stays in L1/L2 while every
 * tile of the batch passes over it. A single decision is a tile with R = 1 and P = 8.
 *
 * Row independence: every output element gets the same operations in the same order whatever R
 * and P are (its accumulator starts from (y or 0) + bias and adds its products in input order, or
 * per group the exact integer dot product, then the same two FMAs), so a batch row equals that
 * row stepped alone, bit for bit, and the results equal the 256-bit kernels' (AVX2 for fp32 and
 * int16 activations, VNNI for int8) bit for bit too.
 */
#include "internal.h"

/* Built where the compiler has every AVX-512 extension used here (the Makefile probes it; the
 * VNNI-256 file, whose quantizer the VNNI512 table shares, is then built too). */
#if (defined(__x86_64__) || defined(_M_X64)) && defined(COGBERT_HAVE_AVX512) && defined(COGBERT_HAVE_VNNI)
#include <immintrin.h>
#include <string.h>

#define W16 16
/* Complete unrolling of the tile loops, so that the accumulator arrays become registers. */
#define UNROLL _Pragma("GCC unroll 16")
#define INLINE static inline __attribute__((always_inline))

static size_t rows_in(const cb_layer *L, size_t p) {
    size_t r = L->rows - p * W16;
    return r > W16 ? W16 : r;
}

static __mmask16 row_mask(const cb_layer *L, size_t p) {
    const size_t n = rows_in(L, p);
    return (__mmask16)(n >= W16 ? 0xFFFFu : (1u << n) - 1u);
}

/* (y or 0) + bias, as the 256-bit kernels start an accumulator (masked: y has rows_in values). */
INLINE __m512 init_acc(const cb_layer *L, size_t p, const float *y, int acc) {
    __m512 a = acc ? _mm512_maskz_loadu_ps(row_mask(L, p), y + p * W16) : _mm512_setzero_ps();
    if (L->bias)
        a = _mm512_add_ps(a, _mm512_loadu_ps(L->bias + p * W16));
    return a;
}

INLINE void store_acc(const cb_layer *L, size_t p, float *y, __m512 v) {
    _mm512_mask_storeu_ps(y + p * W16, row_mask(L, p), v);
}

/* ---- fp32 -------------------------------------------------------------------------------- */

INLINE void f32_tile(const cb_layer *L, size_t p0, const float *x, size_t ldx, float *y, size_t ldy, int acc,
                     const int R, const int P) {
    const size_t cols = L->cols, stride = cols * W16;
    const float *w = L->w + p0 * stride;
    __m512 a[4][8];
    size_t j;
    int r, q;
    UNROLL for (r = 0; r < R; r++)
        UNROLL for (q = 0; q < P; q++)
            a[r][q] = init_acc(L, p0 + (size_t)q, y + (size_t)r * ldy, acc);
    for (j = 0; j < cols; j++) {
        __m512 wv[8];
        UNROLL for (q = 0; q < P; q++)
            wv[q] = _mm512_loadu_ps(w + (size_t)q * stride + j * W16);
        UNROLL for (r = 0; r < R; r++) {
            const __m512 xb = _mm512_set1_ps(x[(size_t)r * ldx + j]);
            UNROLL for (q = 0; q < P; q++)
                a[r][q] = _mm512_fmadd_ps(wv[q], xb, a[r][q]);
        }
    }
    UNROLL for (r = 0; r < R; r++)
        UNROLL for (q = 0; q < P; q++)
            store_acc(L, p0 + (size_t)q, y + (size_t)r * ldy, a[r][q]);
}

/* One tile of R rows over panels p0..p0+np-1 (np <= the block width of that R). */
static void f32_rows(const cb_layer *L, size_t p0, size_t np, const float *x, size_t ldx, float *y, size_t ldy,
                     int acc, size_t R) {
#define F32(r, p) f32_tile(L, p0, x, ldx, y, ldy, acc, r, p)
    switch (R * 16 + np) {
    case 0x11: F32(1, 1); break;
    case 0x12: F32(1, 2); break;
    case 0x13: F32(1, 3); break;
    case 0x14: F32(1, 4); break;
    case 0x15: F32(1, 5); break;
    case 0x16: F32(1, 6); break;
    case 0x17: F32(1, 7); break;
    case 0x18: F32(1, 8); break;
    case 0x21: F32(2, 1); break;
    case 0x22: F32(2, 2); break;
    case 0x23: F32(2, 3); break;
    case 0x24: F32(2, 4); break;
    case 0x31: F32(3, 1); break;
    case 0x32: F32(3, 2); break;
    case 0x33: F32(3, 3); break;
    case 0x34: F32(3, 4); break;
    case 0x41: F32(4, 1); break;
    case 0x42: F32(4, 2); break;
    case 0x43: F32(4, 3); break;
    default: F32(4, 4); break;
    }
#undef F32
}

static void linear_f32(const cb_layer *L, size_t B, const float *x, size_t ldx, float *y, size_t ldy, int acc) {
    /* A single row has no other row to reuse weights with: 8 panels keep 8 FMA chains going. */
    const size_t block = B == 1 ? 8 : 4;
    size_t p, b;
    for (p = 0; p < L->panels; p += block) {
        const size_t np = L->panels - p < block ? L->panels - p : block;
        for (b = 0; b < B; b += 4) {
            const size_t R = B - b < 4 ? B - b : 4;
            f32_rows(L, p, np, x + b * ldx, ldx, y + b * ldy, ldy, acc, R);
        }
    }
}

/* ---- quantized: the per-group epilogue shared by both activation widths ------------------- */

/* y += (scale * xs) * dot + qbias * xsum, the 256-bit kernels' two FMAs. */
INLINE __m512 group_out(const cb_layer *L, size_t p, size_t g, __m512i dot, __m512 sx, __m512 sm, __m512 yv) {
    const size_t at = (p * L->groups + g) * W16;
    yv = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_loadu_ps(L->scale + at), sx), yv);
    return _mm512_fmadd_ps(_mm512_loadu_ps(L->qbias + at), sm, yv);
}

INLINE __m512i bcast32(const void *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* ---- quantized, int8 activations (VNNI512) ------------------------------------------------- */

INLINE void q8_tile(const cb_layer *L, size_t p0, const int8_t *xq, size_t ld8, const float *xs, const float *xsum,
                    size_t ldg, float *y, size_t ldy, int acc, const int R, const int P) {
    const size_t stride = L->cols * W16, quads = L->group / 4;
    const uint8_t *w = L->q + p0 * stride;
    __m512 yv[4][8];
    size_t g, t;
    int r, q;
    UNROLL for (r = 0; r < R; r++)
        UNROLL for (q = 0; q < P; q++)
            yv[r][q] = init_acc(L, p0 + (size_t)q, y + (size_t)r * ldy, acc);
    for (g = 0; g < L->groups; g++) {
        __m512i d[4][8];
        UNROLL for (r = 0; r < R; r++)
            UNROLL for (q = 0; q < P; q++)
                d[r][q] = _mm512_setzero_si512();
        for (t = 0; t < quads; t++) {
            const size_t jq = g * quads + t;
            __m512i wv[8];
            UNROLL for (q = 0; q < P; q++)
                wv[q] = _mm512_loadu_si512((const void *)(w + (size_t)q * stride + jq * 4 * W16));
            UNROLL for (r = 0; r < R; r++) {
                const __m512i xb = bcast32(xq + (size_t)r * ld8 + 4 * jq);
                UNROLL for (q = 0; q < P; q++)
                    d[r][q] = _mm512_dpbusd_epi32(d[r][q], wv[q], xb);
            }
        }
        UNROLL for (r = 0; r < R; r++) {
            const __m512 sx = _mm512_set1_ps(xs[(size_t)r * ldg + g]), sm = _mm512_set1_ps(xsum[(size_t)r * ldg + g]);
            UNROLL for (q = 0; q < P; q++)
                yv[r][q] = group_out(L, p0 + (size_t)q, g, d[r][q], sx, sm, yv[r][q]);
        }
    }
    UNROLL for (r = 0; r < R; r++)
        UNROLL for (q = 0; q < P; q++)
            store_acc(L, p0 + (size_t)q, y + (size_t)r * ldy, yv[r][q]);
}

static void q8_rows(const cb_layer *L, size_t p0, size_t np, const int8_t *xq, size_t ld8, const float *xs,
                    const float *xsum, size_t ldg, float *y, size_t ldy, int acc, size_t R) {
#define Q8(r, p) q8_tile(L, p0, xq, ld8, xs, xsum, ldg, y, ldy, acc, r, p)
    switch (R * 16 + np) {
    case 0x11: Q8(1, 1); break;
    case 0x12: Q8(1, 2); break;
    case 0x13: Q8(1, 3); break;
    case 0x14: Q8(1, 4); break;
    case 0x15: Q8(1, 5); break;
    case 0x16: Q8(1, 6); break;
    case 0x17: Q8(1, 7); break;
    case 0x18: Q8(1, 8); break;
    case 0x21: Q8(2, 1); break;
    case 0x22: Q8(2, 2); break;
    case 0x23: Q8(2, 3); break;
    case 0x24: Q8(2, 4); break;
    case 0x31: Q8(3, 1); break;
    case 0x32: Q8(3, 2); break;
    case 0x33: Q8(3, 3); break;
    case 0x34: Q8(3, 4); break;
    case 0x41: Q8(4, 1); break;
    case 0x42: Q8(4, 2); break;
    case 0x43: Q8(4, 3); break;
    default: Q8(4, 4); break;
    }
#undef Q8
}

static void linear_q8(const cb_layer *L, size_t B, const int16_t *xq16, size_t ldq, const float *xs,
                      const float *xsum, size_t ldg, float *y, size_t ldy, int acc) {
    /* The activation buffer holds int8 here (cb_vnni_quantize); ldq counts int16 slots. */
    const int8_t *xq = (const int8_t *)(const void *)xq16;
    const size_t ld8 = 2 * ldq, block = B == 1 ? 8 : 4;
    size_t p, b;
    for (p = 0; p < L->panels; p += block) {
        const size_t np = L->panels - p < block ? L->panels - p : block;
        for (b = 0; b < B; b += 4) {
            const size_t R = B - b < 4 ? B - b : 4;
            q8_rows(L, p, np, xq + b * ld8, ld8, xs + b * ldg, xsum + b * ldg, ldg, y + b * ldy, ldy, acc, R);
        }
    }
}

/* ---- quantized, int16 activations (AVX512) ------------------------------------------------- */

/* As in kernels_avx2.c: the 64 bytes of a quad step are 16 rows x inputs j..j+3; as int16 words
 * the low bytes are inputs j, j+2 and the high bytes j+1, j+3, met by the activation pairs
 * (x_j, x_j+2) and (x_j+1, x_j+3) that cb_avx2_quantize stores side by side. */
INLINE void q16_tile(const cb_layer *L, size_t p0, const int16_t *xq, size_t ldq, const float *xs,
                     const float *xsum, size_t ldg, float *y, size_t ldy, int acc, const int R, const int P) {
    const __m512i lo8 = _mm512_set1_epi16(0x00FF);
    const size_t stride = L->cols * W16, quads = L->group / 4;
    const uint8_t *w = L->q + p0 * stride;
    __m512 yv[4][4];
    size_t g, t;
    int r, q;
    UNROLL for (r = 0; r < R; r++)
        UNROLL for (q = 0; q < P; q++)
            yv[r][q] = init_acc(L, p0 + (size_t)q, y + (size_t)r * ldy, acc);
    for (g = 0; g < L->groups; g++) {
        __m512i d[4][4];
        UNROLL for (r = 0; r < R; r++)
            UNROLL for (q = 0; q < P; q++)
                d[r][q] = _mm512_setzero_si512();
        for (t = 0; t < quads; t++) {
            const size_t jq = g * quads + t;
            __m512i e[4], o[4];
            UNROLL for (q = 0; q < P; q++) {
                const __m512i v = _mm512_loadu_si512((const void *)(w + (size_t)q * stride + jq * 4 * W16));
                e[q] = _mm512_and_si512(v, lo8);
                o[q] = _mm512_srli_epi16(v, 8);
            }
            UNROLL for (r = 0; r < R; r++) {
                const int16_t *xr = xq + (size_t)r * ldq + 4 * jq;
                const __m512i x02 = bcast32(xr), x13 = bcast32(xr + 2);
                UNROLL for (q = 0; q < P; q++)
                    d[r][q] = _mm512_add_epi32(d[r][q], _mm512_add_epi32(_mm512_madd_epi16(e[q], x02),
                                                                         _mm512_madd_epi16(o[q], x13)));
            }
        }
        UNROLL for (r = 0; r < R; r++) {
            const __m512 sx = _mm512_set1_ps(xs[(size_t)r * ldg + g]), sm = _mm512_set1_ps(xsum[(size_t)r * ldg + g]);
            UNROLL for (q = 0; q < P; q++)
                yv[r][q] = group_out(L, p0 + (size_t)q, g, d[r][q], sx, sm, yv[r][q]);
        }
    }
    UNROLL for (r = 0; r < R; r++)
        UNROLL for (q = 0; q < P; q++)
            store_acc(L, p0 + (size_t)q, y + (size_t)r * ldy, yv[r][q]);
}

static void q16_rows(const cb_layer *L, size_t p0, size_t np, const int16_t *xq, size_t ldq, const float *xs,
                     const float *xsum, size_t ldg, float *y, size_t ldy, int acc, size_t R) {
#define Q16(r, p) q16_tile(L, p0, xq, ldq, xs, xsum, ldg, y, ldy, acc, r, p)
    switch (R * 16 + np) {
    case 0x11: Q16(1, 1); break;
    case 0x12: Q16(1, 2); break;
    case 0x13: Q16(1, 3); break;
    case 0x14: Q16(1, 4); break;
    case 0x21: Q16(2, 1); break;
    case 0x22: Q16(2, 2); break;
    case 0x31: Q16(3, 1); break;
    case 0x32: Q16(3, 2); break;
    case 0x41: Q16(4, 1); break;
    default: Q16(4, 2); break;
    }
#undef Q16
}

static void linear_q16(const cb_layer *L, size_t B, const int16_t *xq, size_t ldq, const float *xs,
                       const float *xsum, size_t ldg, float *y, size_t ldy, int acc) {
    const size_t block = B == 1 ? 4 : 2;
    size_t p, b;
    for (p = 0; p < L->panels; p += block) {
        const size_t np = L->panels - p < block ? L->panels - p : block;
        for (b = 0; b < B; b += 4) {
            const size_t R = B - b < 4 ? B - b : 4;
            q16_rows(L, p, np, xq + b * ldq, ldq, xs + b * ldg, xsum + b * ldg, ldg, y + b * ldy, ldy, acc, R);
        }
    }
}

/* ---- the LSTM cell ------------------------------------------------------------------------- */

/* kernels_avx2.c's exp, sigmoid and tanh on 16 lanes: the same IEEE operations in the same
 * order per lane, so the cell's results equal the AVX2 cell's bit for bit, in half the
 * instructions (the cell is a fifth of an int8 step at batch 64). */
INLINE __m512 exp16(__m512 x) {
    __m512 fx, r, p;
    __m512i e;
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
    p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

INLINE __m512 sigmoid16(__m512 v) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

INLINE __m512 tanh16(__m512 v) {
    const __m512 two = _mm512_set1_ps(2.0f);
    return _mm512_sub_ps(_mm512_mul_ps(two, sigmoid16(_mm512_mul_ps(two, v))), _mm512_set1_ps(1.0f));
}

static void cell(size_t B, size_t H, const float *gates, size_t ldg, const float *c_in, float *h_out, float *c_out) {
    size_t b, k;
    for (b = 0; b < B; b++) {
        const float *z = gates + b * ldg;
        for (k = 0; k < H; k += W16) {
            /* A short tail loads zeros in the missing lanes, as the AVX2 cell's padded copy does. */
            const __mmask16 m = (__mmask16)(H - k >= W16 ? 0xFFFFu : (1u << (H - k)) - 1u);
            const __m512 i = sigmoid16(_mm512_maskz_loadu_ps(m, z + k));
            const __m512 f = sigmoid16(_mm512_maskz_loadu_ps(m, z + H + k));
            const __m512 g = tanh16(_mm512_maskz_loadu_ps(m, z + 2 * H + k));
            const __m512 o = sigmoid16(_mm512_maskz_loadu_ps(m, z + 3 * H + k));
            const __m512 c = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, c_in + b * H + k), _mm512_mul_ps(i, g));
            _mm512_mask_storeu_ps(c_out + b * H + k, m, c);
            _mm512_mask_storeu_ps(h_out + b * H + k, m, _mm512_mul_ps(o, tanh16(c)));
        }
    }
}

const cb_kernels cb_avx512_kernels = {COGBERT_KERNEL_AVX512, W16, linear_f32, linear_q16, cb_avx2_quantize, cell};
const cb_kernels cb_vnni512_kernels = {COGBERT_KERNEL_VNNI512, W16, linear_f32, linear_q8, cb_vnni_quantize, cell};

#else
const cb_kernels cb_avx512_kernels = {0, CB_PANEL_MAX, NULL, NULL, NULL, NULL};
const cb_kernels cb_vnni512_kernels = {0, CB_PANEL_MAX, NULL, NULL, NULL, NULL};
#endif
