/* Opening a policy: validate the bundle (bundle.c), choose the kernels (dispatch.c), repack the
 * weights into the layout those kernels read; and the policy's accessors. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    const size_t W = P->k.panel;
    int of = 0;
    size_t r, j, g, part;
    memset(L, 0, sizeof *L);
    L->panel = W;
    L->kind = a->bits ? CB_L_Q : CB_L_F32;
    L->rows = rows;
    L->cols = cols;
    L->panels = (rows + W - 1) / W;
    if (a->has_bias) {
        float *bias = (float *)palloc(P, L->panels * W, sizeof(float), &of);
        if (!bias)
            return of ? COGBERT_ERR_BUNDLE : COGBERT_ERR_NO_MEMORY;
        for (r = 0; r < rows; r++)
            bias[r] = cb_le_f32(a->bias + 4 * r);
        L->bias = bias;
    }
    if (L->kind == CB_L_F32) {
        float *w = (float *)palloc(P, cb_mul(L->panels * W, cols, &of), sizeof(float), &of);
        if (!w)
            return of ? COGBERT_ERR_BUNDLE : COGBERT_ERR_NO_MEMORY;
        for (part = 0; part < (b ? 2u : 1u); part++) {
            const cb_src_layer *s = part ? b : a;
            const size_t off = part ? a->in : 0;
            for (r = 0; r < rows; r++)
                for (j = 0; j < s->in; j++)
                    w[((r / W) * cols + off + j) * W + r % W] = cb_le_f32(s->weight + 4 * (r * s->in + j));
        }
        L->w = w;
    } else {
        uint8_t *q;
        float *sc, *qb;
        L->group = a->group;
        L->groups = cols / a->group;
        q = (uint8_t *)palloc(P, cb_mul(L->panels * W, cols, &of), 1, &of);
        sc = (float *)palloc(P, cb_mul(L->panels * W, L->groups, &of), sizeof(float), &of);
        qb = (float *)palloc(P, cb_mul(L->panels * W, L->groups, &of), sizeof(float), &of);
        if (!q || !sc || !qb)
            return of ? COGBERT_ERR_BUNDLE : COGBERT_ERR_NO_MEMORY;
        for (part = 0; part < (b ? 2u : 1u); part++) {
            const cb_src_layer *s = part ? b : a;
            const size_t off = part ? a->in : 0, goff = off / a->group, sg = s->in / s->group;
            for (r = 0; r < rows; r++) {
                const size_t p = r / W, lane = r % W;
                for (j = 0; j < s->in; j++) {
                    const size_t col = off + j;
                    q[p * cols * W + (col / 4) * 4 * W + lane * 4 + (col & 3)] = code_at(s, r, j);
                }
                for (g = 0; g < sg; g++) {
                    sc[(p * L->groups + goff + g) * W + lane] = cb_le_f32(s->scales + 4 * (r * sg + g));
                    qb[(p * L->groups + goff + g) * W + lane] = cb_le_f32(s->biases + 4 * (r * sg + g));
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
    cb_allocator_from(options, &a);
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
        rc = cb_choose_kernels(options ? options->kernel : COGBERT_KERNEL_AUTO, &P->k, error);
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
             (unsigned long)P->macs, cb_kernel_name(P->k.id), (unsigned long)P->bytes);
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
    cb_allocator_from(options, &a);
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
