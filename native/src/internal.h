/* Private declarations shared by the library's translation units. Not installed. */
#ifndef COGBERT_INTERNAL_H
#define COGBERT_INTERNAL_H

#include "cogbert.h"

#include <stddef.h>
#include <stdint.h>

/* Output rows are processed in panels: 8 rows (one AVX2 register of fp32 lanes, two NEON ones)
 * for the AVX2, VNNI-256, NEON and scalar kernels, 16 (one AVX-512 register) for the AVX-512
 * ones. The kernel table says which; the weights are repacked for it when the policy opens. */
#define CB_PANEL 8
#define CB_PANEL_MAX 16
#define CB_MAX_ENCODER 8
#define CB_MAX_LAYERS (CB_MAX_ENCODER + 4)
#define CB_MAX_DIM 65536u
/* Activations of quantized layers are quantized per group to int16 with this many levels a side. */
#define CB_ACT_LEVELS 32767.0f
/* Position of input j%4 inside its quad of xq. */
#define CB_QPOS(j) (((j) & ~(size_t)3) + (((j) & 1) << 1) + (((j) >> 1) & 1))

/* Every block the library allocates is aligned to this (cache lines; no SIMD load straddles). */
#define CB_ALIGN 64

/* ---- allocator (alloc.c) and status helpers (status.c): depend on libc only ----------- */

typedef struct {
    cogbert_alloc_fn alloc;
    cogbert_free_fn free;
    void *ctx;
} cb_allocator;

/* The options' allocator, or malloc/free when options is NULL or sets none. */
void cb_allocator_from(const cogbert_options *options, cb_allocator *a);
void *cb_malloc(const cb_allocator *a, size_t size);
void cb_free(const cb_allocator *a, void *p);
/* a * b, or 0 with *overflow set when it does not fit size_t. */
size_t cb_mul(size_t a, size_t b, int *overflow);

void cb_set_error(cogbert_error *err, int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ---- strict bounded JSON (json.c) ------------------------------------------------------ */

enum { CB_J_NULL, CB_J_FALSE, CB_J_TRUE, CB_J_NUM, CB_J_STR, CB_J_ARR, CB_J_OBJ };

typedef struct {
    uint8_t type;
    uint8_t is_int;     /* CB_J_NUM: no fraction and no exponent (Python gives an int) */
    uint32_t len;       /* STR: decoded bytes; NUM: token bytes; ARR: elements; OBJ: members */
    uint32_t off;       /* STR: offset in the string arena; NUM: offset in the source; ARR/OBJ: first child */
    uint32_t next;      /* next sibling (0: none; the root is node 0 and never a sibling) */
} cb_jnode;             /* object children alternate key (STR), value */

typedef struct {
    cb_jnode *nodes;
    uint32_t count;
    char *strings;       /* decoded strings, each NUL-terminated (they may also hold NULs) */
    const char *src;     /* the parsed text (numbers point into it) */
    size_t src_len;
    const cb_allocator *alloc;
} cb_json;

#define CB_JSON_MAX_DEPTH 64

/* Parse text[0..len) as one JSON value with optional surrounding JSON whitespace, as Python's
 * json.loads does, but strictly: duplicate keys (compared after unescaping) and NaN/Infinity are
 * errors. Returns 0, or -1 with a reason in why (>= 96 bytes) and nothing allocated. */
int cb_json_parse(cb_json *out, const char *text, size_t len, const cb_allocator *a, char *why, size_t why_len);
void cb_json_free(cb_json *j);
const cb_jnode *cb_json_node(const cb_json *j, uint32_t index);
/* Member of an object by key, or NULL. */
const cb_jnode *cb_json_get(const cb_json *j, const cb_jnode *obj, const char *key);
/* 1 if the object's keys are exactly keys[0..n). */
int cb_json_keys_are(const cb_json *j, const cb_jnode *obj, const char *const *keys, size_t n);
int cb_json_str_eq(const cb_json *j, const cb_jnode *n, const char *s);
const char *cb_json_str(const cb_json *j, const cb_jnode *n);
/* An integer literal (not bool, not float) in [0, max]: 1 and *out, else 0. "-0" is 0. */
int cb_json_uint(const cb_json *j, const cb_jnode *n, uint64_t max, uint64_t *out);
/* Any number as the nearest double (Python's float()); 0 if not a number or on allocation failure. */
int cb_json_double(const cb_json *j, const cb_jnode *n, double *out);

/* ---- bundle (bundle.c) ----------------------------------------------------------------- */

enum { CB_L_F32 = 0, CB_L_Q = 1 };

typedef struct {
    size_t in, out;
    int has_bias;
    int bits;                   /* 0: fp32 */
    size_t group;
    const uint8_t *weight;      /* little-endian F32 [out][in] or U32 [out][in*bits/32], in the caller's buffer */
    const uint8_t *scales;      /* F32 [out][in/group] */
    const uint8_t *biases;      /* F32 [out][in/group] */
    const uint8_t *bias;        /* F32 [out] or NULL */
} cb_src_layer;

typedef struct {
    size_t obs_dim, hidden, action_size, n_enc, enc[CB_MAX_ENCODER];
    int continuous;
    double clip;
    size_t n_layers;            /* n_enc + 4: encoder.*, lstm.ih, lstm.hh, policy, value */
    cb_src_layer layers[CB_MAX_LAYERS];
    const uint8_t *mean, *std, *log_std;
    char model_id[132];
} cb_bundle;

int cb_bundle_parse(const uint8_t *data, size_t size, const cb_allocator *a, cb_bundle *out, cogbert_error *err);
float cb_le_f32(const uint8_t *p);
uint32_t cb_le_u32(const uint8_t *p);

/* ---- kernels ------------------------------------------------------------------------- */

typedef struct {
    int kind;                   /* CB_L_F32 or CB_L_Q */
    size_t panel;               /* rows per panel: 8 or 16 (the kernel table's), written W below */
    size_t rows, cols, panels;
    size_t group, groups;       /* CB_L_Q */
    const float *w;             /* F32: [panels][cols][W] (row r of panel p is output p*W+r) */
    const uint8_t *q;           /* Q: [panels][cols/4][W][4] unsigned codes, 4 adjacent inputs per row */
    const float *scale;         /* Q: [panels][groups][W] */
    const float *qbias;         /* Q: [panels][groups][W] */
    const float *bias;          /* [panels*W], zero padded, or NULL */
} cb_layer;

/* y[b][0..rows) (+)= layer(x[b]) for b < B. acc: add to y instead of overwriting.
 * For a given element the operation order does not depend on B, so batch rows equal singles. */
typedef void (*cb_linear_f32_fn)(const cb_layer *L, size_t B, const float *x, size_t ldx,
                                 float *y, size_t ldy, int acc);
/* The same for a quantized layer on activations quantized by cb_quantize_fn. */
typedef void (*cb_linear_q_fn)(const cb_layer *L, size_t B, const int16_t *xq, size_t ldq,
                               const float *xs, const float *xsum, size_t ldg,
                               float *y, size_t ldy, int acc);
/* Per row and group of `group` columns: xs = max|x| / 32767, xq = round(x / xs), xsum = sum x.
 * xq keeps each quad of inputs in the order (x0, x2, x1, x3): the kernels multiply the even and
 * the odd bytes of a weight quad by the int16 pairs (x0, x2) and (x1, x3) (see kernels_avx2.c). */
typedef void (*cb_quantize_fn)(size_t B, size_t cols, size_t group, const float *x, size_t ldx,
                               int16_t *xq, size_t ldq, float *xs, float *xsum, size_t ldg);
/* gates [B][4H] (i, f, g, o pre-activations), c_in [B][H] -> h_out, c_out [B][H]. */
typedef void (*cb_cell_fn)(size_t B, size_t H, const float *gates, size_t ldg, const float *c_in,
                           float *h_out, float *c_out);

typedef struct {
    int id;
    size_t panel;               /* the weight layout these kernels read: CB_PANEL or 16 */
    cb_linear_f32_fn linear_f32;
    cb_linear_q_fn linear_q;
    cb_quantize_fn quantize;
    cb_cell_fn cell;
} cb_kernels;

/* Kernel tables are data, not code: reading one runs no instruction of its ISA, so the library
 * can look at a table on any CPU and call into it only after the CPU check. id 0: not built. */
extern const cb_kernels cb_scalar_kernels, cb_scalar8_kernels, cb_avx2_kernels, cb_vnni_kernels, cb_neon_kernels,
    cb_avx512_kernels, cb_vnni512_kernels;
/* The AVX2 fp32 product, LSTM cell and int16 activation quantizer, shared by the VNNI and
 * AVX-512 tables; the VNNI int8 quantizer, shared by the VNNI-512 table. Activations are laid
 * out per batch row, whatever the panel width, so the quantizers serve both layouts. */
void cb_avx2_linear_f32(const cb_layer *L, size_t B, const float *x, size_t ldx, float *y, size_t ldy, int acc);
void cb_avx2_cell(size_t B, size_t H, const float *gates, size_t ldg, const float *c_in, float *h_out, float *c_out);
void cb_avx2_quantize(size_t B, size_t cols, size_t group, const float *x, size_t ldx, int16_t *xq, size_t ldq,
                      float *xs, float *xsum, size_t ldg);
void cb_vnni_quantize(size_t B, size_t cols, size_t group, const float *x, size_t ldx, int16_t *xq, size_t ldq,
                      float *xs, float *xsum, size_t ldg);

/* ---- CPU dispatch (dispatch.c) -------------------------------------------------------- */

int cb_cpu_has_avx2_fma(void);
int cb_cpu_has_avx512_vnni(void);
int cb_cpu_has_avx512(void);
/* The table for a COGBERT_KERNEL_* (AUTO: the best this build and CPU have) into *out, or
 * ARGUMENT / UNSUPPORTED with err filled. */
int cb_choose_kernels(int want, cb_kernels *out, cogbert_error *err);
const char *cb_kernel_name(int id);

/* ---- policy (policy.c), state (state.c), step (step.c), sampling (sample.c) ------------- */

struct cogbert_policy {
    cb_allocator alloc;
    cb_kernels k;
    size_t obs_dim, hidden, action_size, n_enc, lstm_in, cat_w, max_width, max_qcols, max_groups;
    int continuous, fused, weight_bits;
    float clip;
    float *mean, *std, *log_std;
    cb_layer enc[CB_MAX_ENCODER], lstm, lstm_hh, policy, value;
    size_t bytes, macs;
    void *mem[4 * CB_MAX_LAYERS + 8];
    size_t n_mem;
    char model_id[132];
};

struct cogbert_state {
    const cogbert_policy *p;
    size_t max_batch;
    float *h, *c, *xa, *xb, *cat, *gates, *xs, *xsum, *head, *value;
    int16_t *xq;
    void *block;
    size_t bytes;
};

int cb_all_finite(const float *x, size_t n);

#endif
