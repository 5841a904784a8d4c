/* Test helper: write a valid bundle (docs/bundle-format.md) in memory, from C alone, so the C
 * tests, the fuzz seeds and the C benchmark need no Python. Random weights, min-max quantization
 * like cogbert_edge/inference/quant.py. Header-only; static functions. */
#ifndef COGBERT_TESTUTIL_H
#define COGBERT_TESTUTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    size_t obs, hidden, actions, n_enc, enc[8];
    int continuous;
    int bits[12];   /* per layer: encoder.0.., lstm.ih, lstm.hh, policy, value; 0 = fp32 */
    int group[12];
    double clip;
    uint32_t seed;
    const char *model_id;
} tu_config;

typedef struct {
    char *hdr;
    size_t hlen, hcap;
    unsigned char *body;
    size_t blen, bcap;
    uint32_t rng;
} tu_buf;

static float tu_rand(tu_buf *b) { /* xorshift32 -> [-1, 1) */
    b->rng ^= b->rng << 13;
    b->rng ^= b->rng >> 17;
    b->rng ^= b->rng << 5;
    return (float)((b->rng >> 8) * (1.0 / 8388608.0)) - 1.0f;
}

static void tu_hdr(tu_buf *b, const char *s) {
    size_t n = strlen(s);
    if (b->hlen + n + 1 > b->hcap) {
        b->hcap = (b->hlen + n + 1) * 2;
        b->hdr = (char *)realloc(b->hdr, b->hcap);
    }
    memcpy(b->hdr + b->hlen, s, n + 1);
    b->hlen += n;
}

static void tu_bytes(tu_buf *b, const void *p, size_t n) {
    if (b->blen + n > b->bcap) {
        b->bcap = (b->blen + n) * 2 + 64;
        b->body = (unsigned char *)realloc(b->body, b->bcap);
    }
    memcpy(b->body + b->blen, p, n);
    b->blen += n;
}

static void tu_tensor(tu_buf *b, const char *name, const char *dtype, size_t d0, size_t d1, const void *data) {
    char tmp[256];
    size_t n = d1 ? d0 * d1 : d0;
    if (d1)
        snprintf(tmp, sizeof tmp, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lu,%lu],\"data_offsets\":[%lu,%lu]}", name, dtype,
                 (unsigned long)d0, (unsigned long)d1, (unsigned long)b->blen, (unsigned long)(b->blen + 4 * n));
    else
        snprintf(tmp, sizeof tmp, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lu],\"data_offsets\":[%lu,%lu]}", name, dtype,
                 (unsigned long)d0, (unsigned long)b->blen, (unsigned long)(b->blen + 4 * n));
    tu_hdr(b, tmp);
    tu_bytes(b, data, 4 * n); /* the test machines are little-endian, as the format is */
}

static void tu_layer(tu_buf *b, const char *name, size_t in, size_t out, int bias, int bits, int group, float gain) {
    float *w = (float *)malloc(in * out * sizeof(float));
    char nm[64];
    size_t k;
    for (k = 0; k < in * out; k++)
        w[k] = gain * tu_rand(b) * (float)sqrt(3.0 / (double)in);
    snprintf(nm, sizeof nm, "%s.weight", name);
    if (!bits) {
        tu_tensor(b, nm, "F32", out, in, w);
    } else {
        const size_t per = 32 / (size_t)bits, groups = in / (size_t)group;
        const float levels = (float)((1 << bits) - 1);
        uint32_t *packed = (uint32_t *)calloc(out * in / per, sizeof(uint32_t));
        float *sc = (float *)malloc(out * groups * sizeof(float)), *bi = (float *)malloc(out * groups * sizeof(float));
        size_t r, g, j;
        for (r = 0; r < out; r++)
            for (g = 0; g < groups; g++) {
                const float *v = w + r * in + g * (size_t)group;
                float lo = v[0], hi = v[0], s, safe;
                for (j = 1; j < (size_t)group; j++) {
                    lo = v[j] < lo ? v[j] : lo;
                    hi = v[j] > hi ? v[j] : hi;
                }
                s = (hi - lo) / levels;
                safe = s > 0 ? s : 1.0f;
                sc[r * groups + g] = s;
                bi[r * groups + g] = lo;
                for (j = 0; j < (size_t)group; j++) {
                    float qf = (float)floor((v[j] - lo) / safe + 0.5f);
                    uint32_t q = (uint32_t)(qf < 0 ? 0 : qf > levels ? levels : qf);
                    size_t col = g * (size_t)group + j;
                    packed[r * (in / per) + col / per] |= q << ((size_t)bits * (col % per));
                }
            }
        tu_tensor(b, nm, "U32", out, in / per, packed);
        snprintf(nm, sizeof nm, "%s.scales", name);
        tu_tensor(b, nm, "F32", out, groups, sc);
        snprintf(nm, sizeof nm, "%s.biases", name);
        tu_tensor(b, nm, "F32", out, groups, bi);
        free(packed);
        free(sc);
        free(bi);
    }
    if (bias) {
        for (k = 0; k < out; k++)
            w[k] = 0.1f * tu_rand(b);
        snprintf(nm, sizeof nm, "%s.bias", name);
        tu_tensor(b, nm, "F32", out, 0, w);
    }
    free(w);
}

/* A bundle for config c; the caller frees the returned buffer. */
static unsigned char *tu_build(const tu_config *c, size_t *size_out) {
    tu_buf b;
    char tmp[1024], enc[128] = "", quant[1024] = "";
    float *v;
    size_t k, width = c->obs, pos, li;
    unsigned char *out;
    uint64_t hl;
    const size_t nl = c->n_enc + 4;
    memset(&b, 0, sizeof b);
    b.rng = c->seed ? c->seed : 1;
    for (k = 0; k < c->n_enc; k++) {
        pos = strlen(enc);
        snprintf(enc + pos, sizeof enc - pos, "%s%lu", k ? "," : "", (unsigned long)c->enc[k]);
    }
    for (li = 0; li < nl; li++) {
        char name[32];
        if (!c->bits[li])
            continue;
        if (li < c->n_enc)
            snprintf(name, sizeof name, "encoder.%lu", (unsigned long)li);
        else
            snprintf(name, sizeof name, "%s", li == c->n_enc ? "lstm.ih" : li == c->n_enc + 1 ? "lstm.hh" : li == c->n_enc + 2 ? "policy" : "value");
        pos = strlen(quant);
        snprintf(quant + pos, sizeof quant - pos, "%s\\\"%s\\\":{\\\"bits\\\":%d,\\\"group_size\\\":%d}", pos ? "," : "", name,
                 c->bits[li], c->group[li]);
    }
    snprintf(tmp, sizeof tmp,
             "{\"__metadata__\":{\"architecture\":\"lstm-ac\",\"config\":\"{\\\"action\\\":{\\\"kind\\\":\\\"%s\\\",\\\"size\\\":%lu},"
             "\\\"encoder\\\":[%s],\\\"hidden\\\":%lu,\\\"obs_dim\\\":%lu}\",\"created_at\":\"2026-11-01T12:00:00Z\","
             "\"format\":\"cogbert-bundle\",\"format_version\":\"1\",\"model_id\":\"%s\",\"normalization\":"
             "\"{\\\"clip\\\":%.17g,\\\"kind\\\":\\\"standardize\\\"}\",\"parent\":\"\",\"quantization\":"
             "\"{\\\"kind\\\":\\\"%s\\\",\\\"layers\\\":{%s}}\",\"x-note\":\"made by testutil.h\"}",
             c->continuous ? "continuous" : "discrete", (unsigned long)c->actions, enc, (unsigned long)c->hidden,
             (unsigned long)c->obs, c->model_id ? c->model_id : "c-test", c->clip, quant[0] ? "affine" : "none", quant);
    tu_hdr(&b, tmp);
    v = (float *)malloc((c->obs + c->actions) * sizeof(float));
    for (k = 0; k < c->obs; k++)
        v[k] = 0.2f * tu_rand(&b);
    tu_tensor(&b, "obs_norm.mean", "F32", c->obs, 0, v);
    for (k = 0; k < c->obs; k++)
        v[k] = 1.25f + tu_rand(&b);
    tu_tensor(&b, "obs_norm.std", "F32", c->obs, 0, v);
    for (k = 0; k < c->n_enc; k++) {
        snprintf(tmp, sizeof tmp, "encoder.%lu", (unsigned long)k);
        tu_layer(&b, tmp, width, c->enc[k], 1, c->bits[k], c->group[k], 1.4f);
        width = c->enc[k];
    }
    tu_layer(&b, "lstm.ih", width, 4 * c->hidden, 1, c->bits[c->n_enc], c->group[c->n_enc], 1.0f);
    tu_layer(&b, "lstm.hh", c->hidden, 4 * c->hidden, 0, c->bits[c->n_enc + 1], c->group[c->n_enc + 1], 1.0f);
    tu_layer(&b, "policy", c->hidden, c->actions, 1, c->bits[c->n_enc + 2], c->group[c->n_enc + 2], 1.0f);
    tu_layer(&b, "value", c->hidden, 1, 1, c->bits[c->n_enc + 3], c->group[c->n_enc + 3], 1.0f);
    if (c->continuous) {
        for (k = 0; k < c->actions; k++)
            v[k] = 0.3f * tu_rand(&b);
        tu_tensor(&b, "policy.log_std", "F32", c->actions, 0, v);
    }
    free(v);
    tu_hdr(&b, "}");
    while (b.hlen % 8)
        tu_hdr(&b, " ");
    out = (unsigned char *)malloc(8 + b.hlen + b.blen);
    hl = b.hlen;
    for (k = 0; k < 8; k++)
        out[k] = (unsigned char)(hl >> (8 * k));
    memcpy(out + 8, b.hdr, b.hlen);
    if (b.blen)
        memcpy(out + 8 + b.hlen, b.body, b.blen);
    *size_out = 8 + b.hlen + b.blen;
    free(b.hdr);
    free(b.body);
    return out;
}

/* The reference model: obs 64, encoder [256], LSTM 256, 8 actions; bits 0, 8 or 4 (group 64). */
#if defined(__GNUC__)
__attribute__((unused))
#endif
static tu_config tu_reference(int bits) {
    tu_config c;
    size_t k;
    memset(&c, 0, sizeof c);
    c.obs = 64;
    c.hidden = 256;
    c.actions = 8;
    c.n_enc = 1;
    c.enc[0] = 256;
    c.clip = 10.0;
    c.seed = 7;
    for (k = 0; k < 3; k++) { /* encoder.0, lstm.ih, lstm.hh; the heads stay fp32 */
        c.bits[k] = bits;
        c.group[k] = 64;
    }
    return c;
}

#endif
