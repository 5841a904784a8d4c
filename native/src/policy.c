/* The public API: open (validate + repack weights), states, the step, sampling. */
#include "internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ALIGN 64

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

/* ---- small helpers ------------------------------------------------------------------- */

static void *default_alloc(void *ctx, size_t size) {
    (void)ctx;
    return malloc(size);
}

static void default_free(void *ctx, void *p) {
    (void)ctx;
    free(p);
}

/* Every block is 64-byte aligned (cache lines; aligned SIMD loads never straddle), whatever the
 * caller's allocator guarantees: over-allocate and keep the original pointer just before. */
void *cb_malloc(const cb_allocator *a, size_t size) {
    unsigned char *raw, *p;
    if (size > (size_t)-1 - ALIGN - sizeof(void *))
        return NULL;
    raw = (unsigned char *)a->alloc(a->ctx, size + ALIGN + sizeof(void *));
    if (!raw)
        return NULL;
    p = raw + sizeof(void *);
    p += (ALIGN - (size_t)((uintptr_t)p % ALIGN)) % ALIGN;
    memcpy(p - sizeof(void *), &raw, sizeof raw);
    return p;
}

void cb_free(const cb_allocator *a, void *p) {
    void *raw;
    if (!p)
        return;
    memcpy(&raw, (unsigned char *)p - sizeof(void *), sizeof raw);
    a->free(a->ctx, raw);
}

size_t cb_mul(size_t a, size_t b, int *overflow) {
    if (a && b > (size_t)-1 / a) {
        *overflow = 1;
        return 0;
    }
    return a * b;
}

void cb_set_error(cogbert_error *err, int status, const char *fmt, ...) {
    va_list ap;
    if (!err)
        return;
    err->status = status;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

int cb_cpu_has_avx2_fma(void) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    /* Checks the CPUID bits and that the OS saves the AVX registers (XGETBV). */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

int cb_cpu_has_avx512_vnni(void) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && defined(COGBERT_HAVE_VNNI)
    __builtin_cpu_init();
    return cb_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

static int cpu_has_neon(void) {
#if defined(__aarch64__) && (defined(__ARM_NEON) || defined(__ARM_NEON__))
    return 1; /* NEON (AdvSIMD) is mandatory on arm64. */
#else
    return 0; /* 32-bit ARM: only when forced, since NEON there is optional. */
#endif
}

uint32_t cogbert_version(void) {
    return ((uint32_t)COGBERT_VERSION_MAJOR << 16) | ((uint32_t)COGBERT_VERSION_MINOR << 8) | COGBERT_VERSION_PATCH;
}

const char *cogbert_version_string(void) {
    return "0.1.0";
}

const char *cogbert_strerror(int status) {
    switch (status) {
    case COGBERT_OK: return "success";
    case COGBERT_ERR_ARGUMENT: return "invalid argument (NULL pointer, batch out of range, or a state of another policy)";
    case COGBERT_ERR_NO_MEMORY: return "out of memory";
    case COGBERT_ERR_IO: return "cannot read the bundle file";
    case COGBERT_ERR_FORMAT: return "not a well-formed safetensors bundle";
    case COGBERT_ERR_VERSION: return "unsupported bundle format version";
    case COGBERT_ERR_BUNDLE: return "invalid Cogbert bundle";
    case COGBERT_ERR_UNSUPPORTED: return "not supported by this build, CPU or model";
    case COGBERT_ERR_NONFINITE: return "observation holds NaN or Inf";
    default: return "unknown status code";
    }
}

void cogbert_options_init(cogbert_options *o) {
    if (o)
        memset(o, 0, sizeof *o);
}

/* ---- open ---------------------------------------------------------------------------- */

static void *palloc(cogbert_policy *P, size_t count, size_t elem, int *overflow) {
    size_t bytes = cb_mul(count, elem, overflow);
    void *p;
    if (*overflow || P->n_mem == sizeof P->mem / sizeof P->mem[0])
        return NULL;
    p = cb_malloc(&P->alloc, bytes ? bytes : 1);
    if (p) {
        memset(p, 0, bytes);
        P->mem[P->n_mem++] = p;
        P->bytes += bytes;
    }
    return p;
}

static uint8_t code_at(const cb_src_layer *s, size_t r, size_t j) {
    const size_t per = 32 / (size_t)s->bits, words = s->in / per;
    const uint32_t word = cb_le_u32(s->weight + 4 * (r * words + j / per));
    return (uint8_t)((word >> ((size_t)s->bits * (j % per))) & ((1u << s->bits) - 1u));
}

/* Repack one layer (or lstm.ih with lstm.hh appended along the input, when `b` is given) into
 * the panel layout of internal.h. */
static int build_layer(cogbert_policy *P, cb_layer *L, const cb_src_layer *a, const cb_src_layer *b) {
    const size_t rows = a->out, cols = a->in + (b ? b->in : 0);
    int of = 0;
    size_t r, j, g, part;
    memset(L, 0, sizeof *L);
    L->kind = a->bits ? CB_L_Q : CB_L_F32;
    L->rows = rows;
    L->cols = cols;
    L->panels = (rows + CB_PANEL - 1) / CB_PANEL;
    if (a->has_bias) {
        float *bias = (float *)palloc(P, L->panels * CB_PANEL, sizeof(float), &of);
        if (!bias)
            return of ? COGBERT_ERR_BUNDLE : COGBERT_ERR_NO_MEMORY;
        for (r = 0; r < rows; r++)
            bias[r] = cb_le_f32(a->bias + 4 * r);
        L->bias = bias;
    }
    if (L->kind == CB_L_F32) {
        float *w = (float *)palloc(P, cb_mul(L->panels * CB_PANEL, cols, &of), sizeof(float), &of);
        if (!w)
            return of ? COGBERT_ERR_BUNDLE : COGBERT_ERR_NO_MEMORY;
        for (part = 0; part < (b ? 2u : 1u); part++) {
            const cb_src_layer *s = part ? b : a;
            const size_t off = part ? a->in : 0;
            for (r = 0; r < rows; r++)
                for (j = 0; j < s->in; j++)
                    w[((r / CB_PANEL) * cols + off + j) * CB_PANEL + r % CB_PANEL] = cb_le_f32(s->weight + 4 * (r * s->in + j));
        }
        L->w = w;
    } else {
        uint8_t *q;
        float *sc, *qb;
        L->group = a->group;
        L->groups = cols / a->group;
        q = (uint8_t *)palloc(P, cb_mul(L->panels * CB_PANEL, cols, &of), 1, &of);
        sc = (float *)palloc(P, cb_mul(L->panels * CB_PANEL, L->groups, &of), sizeof(float), &of);
        qb = (float *)palloc(P, cb_mul(L->panels * CB_PANEL, L->groups, &of), sizeof(float), &of);
        if (!q || !sc || !qb)
            return of ? COGBERT_ERR_BUNDLE : COGBERT_ERR_NO_MEMORY;
        for (part = 0; part < (b ? 2u : 1u); part++) {
            const cb_src_layer *s = part ? b : a;
            const size_t off = part ? a->in : 0, goff = off / a->group, sg = s->in / s->group;
            for (r = 0; r < rows; r++) {
                const size_t p = r / CB_PANEL, lane = r % CB_PANEL;
                for (j = 0; j < s->in; j++) {
                    const size_t col = off + j;
                    q[p * cols * CB_PANEL + (col / 4) * 4 * CB_PANEL + lane * 4 + (col & 3)] = code_at(s, r, j);
                }
                for (g = 0; g < sg; g++) {
                    sc[(p * L->groups + goff + g) * CB_PANEL + lane] = cb_le_f32(s->scales + 4 * (r * sg + g));
                    qb[(p * L->groups + goff + g) * CB_PANEL + lane] = cb_le_f32(s->biases + 4 * (r * sg + g));
                }
            }
        }
        L->q = q;
        L->scale = sc;
        L->qbias = qb;
        if (cols > P->max_qcols)
            P->max_qcols = cols;
        if (L->groups > P->max_groups)
            P->max_groups = L->groups;
    }
    return COGBERT_OK;
}

static float *copy_f32(cogbert_policy *P, const uint8_t *src, size_t n, int *rc) {
    int of = 0;
    size_t k;
    float *d = (float *)palloc(P, n, sizeof(float), &of);
    if (!d) {
        *rc = COGBERT_ERR_NO_MEMORY;
        return NULL;
    }
    for (k = 0; k < n; k++)
        d[k] = cb_le_f32(src + 4 * k);
    return d;
}

static void log_msg(const cogbert_options *o, int level, const char *msg) {
    if (o && o->log)
        o->log(o->log_ctx, level, msg);
}

static const char *kernel_name(int id) {
    switch (id) {
    case COGBERT_KERNEL_SCALAR: return "scalar";
    case COGBERT_KERNEL_AVX2: return "AVX2/FMA";
    case COGBERT_KERNEL_NEON: return "NEON";
    case COGBERT_KERNEL_VNNI: return "AVX512-VNNI";
    case COGBERT_KERNEL_SCALAR_INT8: return "scalar-int8";
    default: return "unknown";
    }
}

/* AUTO: the fastest kernels this build has and this CPU runs. */
static const cb_kernels *best(void) {
    if (cb_vnni_kernels.id && cb_cpu_has_avx512_vnni())
        return &cb_vnni_kernels;
    if (cb_avx2_kernels.id && cb_cpu_has_avx2_fma())
        return &cb_avx2_kernels;
    if (cb_neon_kernels.id && cpu_has_neon())
        return &cb_neon_kernels;
    return &cb_scalar_kernels;
}

int cogbert_best_kernel(void) {
    return best()->id;
}

static int choose_kernels(cogbert_policy *P, int want, cogbert_error *err) {
    const cb_kernels *t = NULL;
    int cpu_ok = 0;
    switch (want) {
    case COGBERT_KERNEL_AUTO:
        t = best();
        cpu_ok = 1;
        break;
    case COGBERT_KERNEL_SCALAR: t = &cb_scalar_kernels; cpu_ok = 1; break;
    case COGBERT_KERNEL_SCALAR_INT8: t = &cb_scalar8_kernels; cpu_ok = 1; break;
    case COGBERT_KERNEL_AVX2: t = &cb_avx2_kernels; cpu_ok = cb_cpu_has_avx2_fma(); break;
    case COGBERT_KERNEL_VNNI: t = &cb_vnni_kernels; cpu_ok = cb_cpu_has_avx512_vnni(); break;
    case COGBERT_KERNEL_NEON: t = &cb_neon_kernels; cpu_ok = 1; break; /* 32-bit ARM: the caller vouches */
    default:
        cb_set_error(err, COGBERT_ERR_ARGUMENT, "unknown kernel %d", want);
        return COGBERT_ERR_ARGUMENT;
    }
    if (!t->id || !cpu_ok) {
        cb_set_error(err, COGBERT_ERR_UNSUPPORTED, "%s kernels requested, but %s", kernel_name(want),
                     t->id ? "this CPU lacks them" : "this build has none");
        return COGBERT_ERR_UNSUPPORTED;
    }
    P->k = *t;
    return COGBERT_OK;
}

int cogbert_open_buffer(const void *data, size_t size, const cogbert_options *options, cogbert_policy **out,
                        cogbert_error *error) {
    cb_allocator a;
    cb_bundle *bd;
    cogbert_policy *P;
    int rc = COGBERT_OK;
    size_t i;
    char msg[320];

    if (error) {
        error->status = COGBERT_OK;
        error->message[0] = 0;
    }
    if (!out || (!data && size)) {
        cb_set_error(error, COGBERT_ERR_ARGUMENT, "data and policy_out must not be NULL");
        if (out)
            *out = NULL;
        return COGBERT_ERR_ARGUMENT;
    }
    *out = NULL;
    a.alloc = options && options->alloc ? options->alloc : default_alloc;
    a.free = options && options->alloc ? options->free : default_free;
    a.ctx = options ? options->alloc_ctx : NULL;
    if (options && (!options->alloc) != (!options->free)) {
        cb_set_error(error, COGBERT_ERR_ARGUMENT, "set both alloc and free, or neither");
        return COGBERT_ERR_ARGUMENT;
    }
    bd = (cb_bundle *)cb_malloc(&a, sizeof *bd);
    P = (cogbert_policy *)cb_malloc(&a, sizeof *P);
    if (!bd || !P) {
        cb_free(&a, bd);
        cb_free(&a, P);
        cb_set_error(error, COGBERT_ERR_NO_MEMORY, "out of memory");
        return COGBERT_ERR_NO_MEMORY;
    }
    memset(P, 0, sizeof *P);
    P->alloc = a;
    rc = cb_bundle_parse((const uint8_t *)(data ? data : ""), size, &a, bd, error);
    if (rc == COGBERT_OK)
        rc = choose_kernels(P, options ? options->kernel : COGBERT_KERNEL_AUTO, error);
    if (rc == COGBERT_OK) {
        const cb_src_layer *ih = &bd->layers[bd->n_enc], *hh = &bd->layers[bd->n_enc + 1];
        P->obs_dim = bd->obs_dim;
        P->hidden = bd->hidden;
        P->action_size = bd->action_size;
        P->n_enc = bd->n_enc;
        P->continuous = bd->continuous;
        P->clip = (float)bd->clip;
        P->lstm_in = ih->in;
        P->cat_w = ih->in + bd->hidden;
        P->max_width = bd->obs_dim;
        P->weight_bits = ih->bits ? ih->bits : 32;
        memcpy(P->model_id, bd->model_id, sizeof P->model_id);
        for (i = 0; i < bd->n_layers; i++)
            P->macs += bd->layers[i].in * bd->layers[i].out;
        P->mean = copy_f32(P, bd->mean, bd->obs_dim, &rc);
        P->std = copy_f32(P, bd->std, bd->obs_dim, &rc);
        if (bd->continuous)
            P->log_std = copy_f32(P, bd->log_std, bd->action_size, &rc);
        for (i = 0; i < bd->n_enc && rc == COGBERT_OK; i++) {
            rc = build_layer(P, &P->enc[i], &bd->layers[i], NULL);
            if (bd->enc[i] > P->max_width)
                P->max_width = bd->enc[i];
        }
        /* One product over [x, h] streams both LSTM weights in one pass when they share a
         * layout; otherwise two products, the second accumulating. */
        P->fused = ih->bits == hh->bits && (ih->bits == 0 || ih->group == hh->group);
        if (rc == COGBERT_OK)
            rc = build_layer(P, &P->lstm, ih, P->fused ? hh : NULL);
        if (rc == COGBERT_OK && !P->fused)
            rc = build_layer(P, &P->lstm_hh, hh, NULL);
        if (rc == COGBERT_OK)
            rc = build_layer(P, &P->policy, &bd->layers[bd->n_enc + 2], NULL);
        if (rc == COGBERT_OK)
            rc = build_layer(P, &P->value, &bd->layers[bd->n_enc + 3], NULL);
        if (rc != COGBERT_OK && error && error->status == COGBERT_OK)
            cb_set_error(error, rc, "%s while repacking the weights", cogbert_strerror(rc));
    }
    cb_free(&a, bd);
    if (rc != COGBERT_OK) {
        if (error)
            log_msg(options, COGBERT_LOG_ERROR, error->message);
        cogbert_close(P);
        return rc;
    }
    P->bytes += sizeof *P;
    snprintf(msg, sizeof msg, "opened model %s: %lu multiply-adds per step, %s kernels, %lu bytes", P->model_id,
             (unsigned long)P->macs, kernel_name(P->k.id), (unsigned long)P->bytes);
    log_msg(options, COGBERT_LOG_INFO, msg);
    *out = P;
    return COGBERT_OK;
}

int cogbert_open_file(const char *path, const cogbert_options *options, cogbert_policy **out, cogbert_error *error) {
    cb_allocator a;
    FILE *f;
    long len;
    unsigned char *buf;
    int rc;
    if (out)
        *out = NULL;
    if (!path || !out) {
        cb_set_error(error, COGBERT_ERR_ARGUMENT, "path and policy_out must not be NULL");
        return COGBERT_ERR_ARGUMENT;
    }
    a.alloc = options && options->alloc ? options->alloc : default_alloc;
    a.free = options && options->alloc ? options->free : default_free;
    a.ctx = options ? options->alloc_ctx : NULL;
    f = fopen(path, "rb");
    if (!f) {
        cb_set_error(error, COGBERT_ERR_IO, "cannot open bundle %.200s", path);
        return COGBERT_ERR_IO;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        cb_set_error(error, COGBERT_ERR_IO, "cannot read bundle %.200s", path);
        return COGBERT_ERR_IO;
    }
    if ((unsigned long)len > (1ul << 30)) {
        fclose(f);
        cb_set_error(error, COGBERT_ERR_FORMAT, "%.200s: %ld bytes is over the 1073741824-byte bundle limit", path, len);
        return COGBERT_ERR_FORMAT;
    }
    buf = (unsigned char *)cb_malloc(&a, (size_t)len + 1);
    if (!buf) {
        fclose(f);
        cb_set_error(error, COGBERT_ERR_NO_MEMORY, "out of memory reading %.200s", path);
        return COGBERT_ERR_NO_MEMORY;
    }
    if (fread(buf, 1, (size_t)len, f) != (size_t)len) {
        fclose(f);
        cb_free(&a, buf);
        cb_set_error(error, COGBERT_ERR_IO, "cannot read bundle %.200s", path);
        return COGBERT_ERR_IO;
    }
    fclose(f);
    rc = cogbert_open_buffer(buf, (size_t)len, options, out, error);
    cb_free(&a, buf);
    return rc;
}

void cogbert_close(cogbert_policy *P) {
    size_t k;
    cb_allocator a;
    if (!P)
        return;
    a = P->alloc;
    for (k = 0; k < P->n_mem; k++)
        cb_free(&a, P->mem[k]);
    cb_free(&a, P);
}

int cogbert_get_info(const cogbert_policy *P, cogbert_info *info) {
    if (!P || !info)
        return COGBERT_ERR_ARGUMENT;
    memset(info, 0, sizeof *info);
    info->obs_dim = P->obs_dim;
    info->hidden = P->hidden;
    info->action_size = P->action_size;
    info->action_kind = P->continuous ? COGBERT_ACTION_CONTINUOUS : COGBERT_ACTION_DISCRETE;
    info->encoder_layers = P->n_enc;
    info->obs_clip = P->clip;
    info->kernel = P->k.id;
    info->weight_bits = P->weight_bits;
    info->macs_per_step = P->macs;
    info->policy_bytes = P->bytes;
    info->state_bytes_per_row = sizeof(float) * (2 * P->hidden + 2 * P->max_width + P->cat_w + 4 * P->hidden +
                                                 2 * P->max_groups + P->action_size + 1) +
                                sizeof(int16_t) * P->max_qcols;
    return COGBERT_OK;
}

const char *cogbert_model_id(const cogbert_policy *P) {
    return P ? P->model_id : "";
}

int cogbert_get_log_std(const cogbert_policy *P, float *out) {
    if (!P || !out)
        return COGBERT_ERR_ARGUMENT;
    if (!P->continuous)
        return COGBERT_ERR_UNSUPPORTED;
    memcpy(out, P->log_std, P->action_size * sizeof(float));
    return COGBERT_OK;
}

/* ---- states -------------------------------------------------------------------------- */

int cogbert_state_create(const cogbert_policy *P, size_t max_batch, cogbert_state **out) {
    cogbert_info info;
    cogbert_state *S;
    size_t per[11], total = 0, k, H;
    unsigned char *base;
    int of = 0;
    if (out)
        *out = NULL;
    if (!P || !out || max_batch == 0 || max_batch > ((size_t)1 << 24))
        return COGBERT_ERR_ARGUMENT;
    cogbert_get_info(P, &info);
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
        total += (cb_mul(per[k], max_batch, &of) + ALIGN - 1) / ALIGN * ALIGN;
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
    base += (per[i] * max_batch + ALIGN - 1) / ALIGN * ALIGN;
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

/* ---- the step ------------------------------------------------------------------------ */

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

static int all_finite(const float *x, size_t n) {
    size_t k;
    uint32_t bad = 0;
    for (k = 0; k < n; k++) {
        uint32_t u;
        memcpy(&u, x + k, sizeof u);
        bad |= (uint32_t)((u & 0x7F800000u) == 0x7F800000u);
    }
    return !bad;
}

static int forward(const cogbert_policy *P, cogbert_state *S, size_t B, const float *obs, const float *h_in,
                   const float *c_in, float *head, float *value, float *h_out, float *c_out) {
    const size_t D = P->obs_dim, H = P->hidden, W = P->max_width, CW = P->cat_w;
    float *x = P->n_enc ? S->xa : S->cat;
    size_t ldx = P->n_enc ? W : CW, b, k, i;
    if (!all_finite(obs, B * D))
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

/* ---- sampling ------------------------------------------------------------------------ */

/* Exactly rounded sum of positive finite doubles: Shewchuk's partials, with the final
 * half-even correction, as CPython's math.fsum does; so the C sampler and the Python SDK's
 * agree to the last bit on which action a given u selects. */
typedef struct {
    double p[64];
    size_t n;
} fsum_t;

static void fsum_add(fsum_t *s, double x) {
    size_t i = 0, j;
    for (j = 0; j < s->n; j++) {
        double y = s->p[j], hi, lo;
        if (fabs(x) < fabs(y)) {
            double t = x;
            x = y;
            y = t;
        }
        hi = x + y;
        lo = y - (hi - x);
        if (lo != 0.0)
            s->p[i++] = lo;
        x = hi;
    }
    s->n = i;
    if (x != 0.0 && s->n < 64)
        s->p[s->n++] = x;
}

static double fsum_result(const fsum_t *s) {
    size_t n = s->n;
    double hi = 0.0, lo = 0.0;
    if (n > 0) {
        hi = s->p[--n];
        while (n > 0) {
            double x = hi, y = s->p[--n];
            hi = x + y;
            lo = y - (hi - x);
            if (lo != 0.0)
                break;
        }
        if (n > 0 && ((lo < 0.0 && s->p[n - 1] < 0.0) || (lo > 0.0 && s->p[n - 1] > 0.0))) {
            double y = lo * 2.0, x = hi + y;
            if (y == x - hi)
                hi = x;
        }
    }
    return hi;
}

int cogbert_argmax(const float *logits, size_t n, int32_t *action) {
    size_t k, best = 0;
    if (!logits || !action || n == 0 || n > (size_t)INT32_MAX)
        return COGBERT_ERR_ARGUMENT;
    for (k = 0; k < n; k++) {
        if (logits[k] != logits[k]) { /* numpy's argmax: the first NaN wins */
            best = k;
            break;
        }
        if (logits[k] > logits[best])
            best = k;
    }
    *action = (int32_t)best;
    return COGBERT_OK;
}

int cogbert_sample(const float *logits, size_t n, double u, int32_t *action, double *log_prob) {
    fsum_t s;
    double cache[64];
    double m, total, acc = 0.0, target;
    size_t k, a;
    if (!logits || !action || n == 0 || n > (size_t)INT32_MAX)
        return COGBERT_ERR_ARGUMENT;
    if (!all_finite(logits, n))
        return COGBERT_ERR_NONFINITE;
    m = logits[0];
    for (k = 1; k < n; k++)
        if (logits[k] > m)
            m = logits[k];
    s.n = 0;
    for (k = 0; k < n; k++) {
        const double w = exp((double)logits[k] - m);
        if (k < 64)
            cache[k] = w; /* the second pass recomputes only beyond 64 actions */
        fsum_add(&s, w);
    }
    total = fsum_result(&s);
    target = u * total;
    a = n - 1;
    for (k = 0; k < n; k++) {
        acc += k < 64 ? cache[k] : exp((double)logits[k] - m);
        if (target < acc) {
            a = k;
            break;
        }
    }
    *action = (int32_t)a;
    if (log_prob)
        *log_prob = ((double)logits[a] - m) - log(total);
    return COGBERT_OK;
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
