/* Bundle format v1 reader: the safetensors layer and the model layer, each check as in
 * cogbert_edge/inference/bundle.py (the reference reader) and docs/bundle-format.md section 6.
 *
 * The bytes are untrusted until every check has passed. Every read is bounds-checked against
 * `size`; every count that sizes an allocation is bounded first (header length, number of
 * tensors, dimensions), so a hostile file makes the reader allocate at most a small multiple of
 * its own size. What this file produces (cb_bundle) points into the caller's buffer; policy.c
 * copies the weights out before the caller's buffer may go away.
 */
#include "internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADER_BYTES (1u << 20)
#define MAX_BUNDLE_BYTES ((size_t)1 << 30)
#define MAX_TENSORS 256
#define MAX_RANK 4
#define MAX_QUOTES (8 * 1024)
#define MAX_CONTAINERS (2 * 1024)
#define UINT53 ((uint64_t)1 << 53)

enum { DT_F32 = 1, DT_U32 = 2 };

typedef struct {
    const char *name;   /* NUL-terminated, in the header JSON's string arena */
    size_t name_len;
    int dtype;
    size_t rank;
    uint64_t shape[MAX_RANK];
    uint64_t begin, end;
} tensor;

uint32_t cb_le_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

float cb_le_f32(const uint8_t *p) {
    uint32_t u = cb_le_u32(p);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Strict UTF-8 (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF), which is what
 * Python's bytes.decode("utf-8") accepts. Returns the offset of the first bad byte, or n. */
static size_t utf8_bad_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t len;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c >= 0xE0 && c <= 0xEF) { len = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { len = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
        else return i;
        if (n - i < len) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        if (len >= 3 && (s[i + 2] < 0x80 || s[i + 2] > 0xBF)) return i;
        if (len == 4 && (s[i + 3] < 0x80 || s[i + 3] > 0xBF)) return i;
        i += len;
    }
    return n;
}

/* [A-Za-z0-9_.-]{1,128}, the whole string. */
static int valid_model_id(const char *s, size_t len) {
    size_t k;
    if (len < 1 || len > 128)
        return 0;
    for (k = 0; k < len; k++) {
        char c = s[k];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return 0;
    }
    return 1;
}

static int valid_tensor_name(const char *s, size_t len) {
    size_t k;
    if (len < 1 || len > 128)
        return 0;
    for (k = 0; k < len; k++) {
        char c = s[k];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.'))
            return 0;
    }
    return 1;
}

static int is_digit(char c) {
    return c >= '0' && c <= '9';
}

/* [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z, the whole string. */
static int valid_created_at(const char *s, size_t len) {
    static const char pattern[] = "dddd-dd-ddTdd:dd:dd";
    size_t i, frac = 0;
    for (i = 0; pattern[i]; i++) {
        if (i >= len || (pattern[i] == 'd' ? !is_digit(s[i]) : s[i] != pattern[i]))
            return 0;
    }
    if (i < len && s[i] == '.') {
        for (i++; i < len && is_digit(s[i]); i++)
            frac++;
        if (frac < 1 || frac > 6)
            return 0;
    }
    return i + 1 == len && s[i] == 'Z';
}

static const char *const META_KEYS[] = {"format", "format_version", "model_id", "architecture", "config",
                                         "normalization", "quantization", "created_at", "parent"};
#define N_META (sizeof META_KEYS / sizeof META_KEYS[0])

typedef struct {
    const cb_allocator *a;
    cogbert_error *err;
    const uint8_t *data;
    size_t size;
} ctx;

static int parse_inner(ctx *c, const cb_json *meta, const cb_jnode *m, const char *key, cb_json *out) {
    char why[128];
    const cb_jnode *v = cb_json_get(meta, m, key);
    int rc = cb_json_parse(out, cb_json_str(meta, v), v->len, c->a, why, sizeof why);
    if (rc == -2) {
        cb_set_error(c->err, COGBERT_ERR_NO_MEMORY, "out of memory parsing metadata '%s'", key);
        return COGBERT_ERR_NO_MEMORY;
    }
    if (rc < 0) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "metadata '%s' is not valid JSON (%s)", key, why);
        return COGBERT_ERR_BUNDLE;
    }
    return COGBERT_OK;
}

/* Python's `value in (a, b, c)` for a JSON number: ints compare exactly, floats after rounding
 * (so 8.0 and 8.000000000000000001 are 8, as in the reference reader). */
static int number_in(const cb_json *j, const cb_jnode *n, const int *allowed, size_t count, int *out) {
    size_t k;
    if (!n || n->type != CB_J_NUM)
        return 0;
    if (n->is_int) {
        uint64_t v;
        if (!cb_json_uint(j, n, 1000, &v))
            return 0;
        for (k = 0; k < count; k++)
            if (v == (uint64_t)allowed[k])
                return (*out = allowed[k], 1);
        return 0;
    } else {
        double d;
        if (!cb_json_double(j, n, &d))
            return 0;
        for (k = 0; k < count; k++)
            if (d == (double)allowed[k])
                return (*out = allowed[k], 1);
        return 0;
    }
}

static int dim(const cb_json *j, const cb_jnode *n, size_t *out) {
    uint64_t v;
    if (!cb_json_uint(j, n, CB_MAX_DIM, &v) || v < 1)
        return 0;
    *out = (size_t)v;
    return 1;
}

static int read_config(ctx *c, const cb_json *j, cb_bundle *b) {
    static const char *const keys[] = {"obs_dim", "encoder", "hidden", "action"};
    static const char *const akeys[] = {"kind", "size"};
    const cb_jnode *root = cb_json_node(j, 0), *enc, *act, *kind, *it;
    uint32_t idx;
    size_t k;
    if (!cb_json_keys_are(j, root, keys, 4)) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "invalid model config: config must be an object with exactly obs_dim, encoder, hidden, action");
        return COGBERT_ERR_BUNDLE;
    }
    act = cb_json_get(j, root, "action");
    if (!cb_json_keys_are(j, act, akeys, 2)) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "invalid model config: config.action must be an object with exactly kind, size");
        return COGBERT_ERR_BUNDLE;
    }
    enc = cb_json_get(j, root, "encoder");
    if (enc->type != CB_J_ARR) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "invalid model config: config.encoder must be a list of integers");
        return COGBERT_ERR_BUNDLE;
    }
    if (enc->len > CB_MAX_ENCODER) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "invalid model config: at most %d encoder layers, got %u",
                     CB_MAX_ENCODER, (unsigned)enc->len);
        return COGBERT_ERR_BUNDLE;
    }
    b->n_enc = enc->len;
    for (k = 0, idx = enc->off; k < enc->len; k++, idx = it->next) {
        it = cb_json_node(j, idx);
        if (!dim(j, it, &b->enc[k])) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "invalid model config: encoder width %lu must be an integer in [1, 65536]",
                         (unsigned long)k);
            return COGBERT_ERR_BUNDLE;
        }
    }
    if (!dim(j, cb_json_get(j, root, "obs_dim"), &b->obs_dim) || !dim(j, cb_json_get(j, root, "hidden"), &b->hidden) ||
        !dim(j, cb_json_get(j, act, "size"), &b->action_size)) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "invalid model config: obs_dim, hidden and action.size must be integers in [1, 65536]");
        return COGBERT_ERR_BUNDLE;
    }
    kind = cb_json_get(j, act, "kind");
    if (cb_json_str_eq(j, kind, "discrete")) {
        b->continuous = 0;
    } else if (cb_json_str_eq(j, kind, "continuous")) {
        b->continuous = 1;
    } else {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "invalid model config: action kind must be 'discrete' or 'continuous'");
        return COGBERT_ERR_BUNDLE;
    }
    return COGBERT_OK;
}

static int read_normalization(ctx *c, const cb_json *j, cb_bundle *b) {
    static const char *const keys[] = {"kind", "clip"};
    const cb_jnode *root = cb_json_node(j, 0), *clip;
    if (!cb_json_keys_are(j, root, keys, 2) || !cb_json_str_eq(j, cb_json_get(j, root, "kind"), "standardize")) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "normalization must be {\"kind\": \"standardize\", \"clip\": <number>}");
        return COGBERT_ERR_BUNDLE;
    }
    clip = cb_json_get(j, root, "clip");
    if (clip->type != CB_J_NUM) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "normalization.clip must be a number");
        return COGBERT_ERR_BUNDLE;
    }
    if (!cb_json_double(j, clip, &b->clip)) {
        cb_set_error(c->err, COGBERT_ERR_NO_MEMORY, "out of memory reading normalization.clip");
        return COGBERT_ERR_NO_MEMORY;
    }
    /* Python: an int too large for a double raises OverflowError, a float literal becomes inf;
     * both are refused. Underflow to 0 is accepted (clipping off). */
    if (!(b->clip >= 0.0) || b->clip > 1.79769313486231570815e308) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "invalid model config: obs_clip must be a finite number >= 0");
        return COGBERT_ERR_BUNDLE;
    }
    return COGBERT_OK;
}

static void layer_name(const cb_bundle *b, size_t li, char *out, size_t cap) {
    if (li < b->n_enc)
        snprintf(out, cap, "encoder.%lu", (unsigned long)li);
    else
        snprintf(out, cap, "%s", li == b->n_enc ? "lstm.ih" : li == b->n_enc + 1 ? "lstm.hh" : li == b->n_enc + 2 ? "policy" : "value");
}

static void plan_layers(cb_bundle *b) {
    size_t i, width = b->obs_dim;
    for (i = 0; i < b->n_enc; i++) {
        b->layers[i].in = width;
        b->layers[i].out = b->enc[i];
        b->layers[i].has_bias = 1;
        width = b->enc[i];
    }
    b->layers[i].in = width;               /* lstm.ih */
    b->layers[i].out = 4 * b->hidden;
    b->layers[i].has_bias = 1;
    b->layers[i + 1].in = b->hidden;       /* lstm.hh */
    b->layers[i + 1].out = 4 * b->hidden;
    b->layers[i + 1].has_bias = 0;
    b->layers[i + 2].in = b->hidden;       /* policy */
    b->layers[i + 2].out = b->action_size;
    b->layers[i + 2].has_bias = 1;
    b->layers[i + 3].in = b->hidden;       /* value */
    b->layers[i + 3].out = 1;
    b->layers[i + 3].has_bias = 1;
    b->n_layers = b->n_enc + 4;
}

static int read_quantization(ctx *c, const cb_json *j, cb_bundle *b) {
    static const char *const keys[] = {"kind", "layers"};
    static const char *const skeys[] = {"bits", "group_size"};
    static const int bits_ok[] = {4, 8}, groups_ok[] = {32, 64, 128};
    const cb_jnode *root = cb_json_node(j, 0), *layers, *kn, *spec;
    uint32_t idx;
    size_t k, li;
    char name[32];
    if (!cb_json_keys_are(j, root, keys, 2) || cb_json_get(j, root, "layers")->type != CB_J_OBJ) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "quantization must be {\"kind\": ..., \"layers\": {...}}");
        return COGBERT_ERR_BUNDLE;
    }
    layers = cb_json_get(j, root, "layers");
    for (k = 0, idx = layers->off; k < layers->len; k++, idx = cb_json_node(j, kn->next)->next) {
        int bits, group;
        kn = cb_json_node(j, idx);
        spec = cb_json_node(j, kn->next);
        if (!cb_json_keys_are(j, spec, skeys, 2)) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "quantization of a layer must be {\"bits\", \"group_size\"}");
            return COGBERT_ERR_BUNDLE;
        }
        if (!number_in(j, cb_json_get(j, spec, "bits"), bits_ok, 2, &bits)) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "quantization of a layer: bits must be one of (4, 8)");
            return COGBERT_ERR_BUNDLE;
        }
        if (!number_in(j, cb_json_get(j, spec, "group_size"), groups_ok, 3, &group)) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "quantization of a layer: group_size must be one of (32, 64, 128)");
            return COGBERT_ERR_BUNDLE;
        }
        for (li = 0; li < b->n_layers; li++) {
            layer_name(b, li, name, sizeof name);
            if (cb_json_str_eq(j, kn, name))
                break;
        }
        if (li == b->n_layers) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "quantization names a layer that is not a layer of this model");
            return COGBERT_ERR_BUNDLE;
        }
        if (b->layers[li].in % (size_t)group) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "layer '%s': input width %lu is not a multiple of group size %d",
                         name, (unsigned long)b->layers[li].in, group);
            return COGBERT_ERR_BUNDLE;
        }
        b->layers[li].bits = bits;
        b->layers[li].group = (size_t)group;
    }
    if (!cb_json_str_eq(j, cb_json_get(j, root, "kind"), layers->len ? "affine" : "none")) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "quantization kind does not match its layers");
        return COGBERT_ERR_BUNDLE;
    }
    return COGBERT_OK;
}

static const tensor *find(const tensor *t, size_t n, const char *name) {
    size_t k, len = strlen(name);
    for (k = 0; k < n; k++)
        if (t[k].name_len == len && memcmp(t[k].name, name, len) == 0)
            return &t[k];
    return NULL;
}

typedef struct {
    char name[48];
    int dtype;
    size_t rank;
    uint64_t shape[2];
    const uint8_t **slot;
} expect;

static void want(expect *e, size_t *n, const char *prefix, const char *suffix, int dtype, uint64_t d0,
                 uint64_t d1, size_t rank, const uint8_t **slot) {
    expect *x = &e[(*n)++];
    snprintf(x->name, sizeof x->name, "%s%s", prefix, suffix);
    x->dtype = dtype;
    x->rank = rank;
    x->shape[0] = d0;
    x->shape[1] = d1;
    x->slot = slot;
}

static int check_tensors(ctx *c, cb_bundle *b, const tensor *t, size_t nt, const uint8_t *body) {
    expect e[2 + 4 * CB_MAX_LAYERS + 1];
    size_t ne = 0, k, li;
    char name[32];
    want(e, &ne, "obs_norm.mean", "", DT_F32, b->obs_dim, 0, 1, &b->mean);
    want(e, &ne, "obs_norm.std", "", DT_F32, b->obs_dim, 0, 1, &b->std);
    for (li = 0; li < b->n_layers; li++) {
        cb_src_layer *L = &b->layers[li];
        layer_name(b, li, name, sizeof name);
        if (L->bits) {
            want(e, &ne, name, ".weight", DT_U32, L->out, L->in * (size_t)L->bits / 32, 2, &L->weight);
            want(e, &ne, name, ".scales", DT_F32, L->out, L->in / L->group, 2, &L->scales);
            want(e, &ne, name, ".biases", DT_F32, L->out, L->in / L->group, 2, &L->biases);
        } else {
            want(e, &ne, name, ".weight", DT_F32, L->out, L->in, 2, &L->weight);
        }
        if (L->has_bias)
            want(e, &ne, name, ".bias", DT_F32, L->out, 0, 1, &L->bias);
    }
    if (b->continuous)
        want(e, &ne, "policy.log_std", "", DT_F32, b->action_size, 0, 1, &b->log_std);
    for (k = 0; k < ne; k++)
        if (!find(t, nt, e[k].name)) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "missing tensors ['%s']", e[k].name);
            return COGBERT_ERR_BUNDLE;
        }
    if (nt != ne) {
        for (k = 0; k < nt; k++) {
            size_t m;
            for (m = 0; m < ne; m++)
                if (t[k].name_len == strlen(e[m].name) && memcmp(t[k].name, e[m].name, t[k].name_len) == 0)
                    break;
            if (m == ne) {
                cb_set_error(c->err, COGBERT_ERR_BUNDLE, "unexpected tensors ['%.64s']", t[k].name);
                return COGBERT_ERR_BUNDLE;
            }
        }
    }
    for (k = 0; k < ne; k++) {
        const tensor *x = find(t, nt, e[k].name);
        size_t d, count = 1;
        if (x->dtype != e[k].dtype) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "tensor '%s' has dtype %s; expected %s", e[k].name,
                         x->dtype == DT_F32 ? "F32" : "U32", e[k].dtype == DT_F32 ? "F32" : "U32");
            return COGBERT_ERR_BUNDLE;
        }
        if (x->rank != e[k].rank || x->shape[0] != e[k].shape[0] || (e[k].rank == 2 && x->shape[1] != e[k].shape[1])) {
            char want_s[48];
            if (e[k].rank == 2)
                snprintf(want_s, sizeof want_s, "[%lu, %lu]", (unsigned long)e[k].shape[0], (unsigned long)e[k].shape[1]);
            else
                snprintf(want_s, sizeof want_s, "[%lu]", (unsigned long)e[k].shape[0]);
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "tensor '%s' has a shape the config does not imply (expected %s)",
                         e[k].name, want_s);
            return COGBERT_ERR_BUNDLE;
        }
        for (d = 0; d < x->rank; d++)
            count *= (size_t)x->shape[d];
        *e[k].slot = body + x->begin;
        if (x->dtype == DT_F32) {
            const uint8_t *p = body + x->begin;
            for (d = 0; d < count; d++) {
                uint32_t u = cb_le_u32(p + 4 * d);
                if ((u & 0x7F800000u) == 0x7F800000u) {
                    cb_set_error(c->err, COGBERT_ERR_BUNDLE, "tensor '%s' holds NaN or Inf values", e[k].name);
                    return COGBERT_ERR_BUNDLE;
                }
            }
        }
    }
    for (k = 0; k < b->obs_dim; k++)
        if (!(cb_le_f32(b->std + 4 * k) > 0.0f)) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "tensor 'obs_norm.std' must be strictly positive");
            return COGBERT_ERR_BUNDLE;
        }
    return COGBERT_OK;
}

static int cmp_span(const void *pa, const void *pb) {
    const tensor *a = (const tensor *)pa, *b = (const tensor *)pb;
    if (a->begin != b->begin)
        return a->begin < b->begin ? -1 : 1;
    if (a->end != b->end)
        return a->end < b->end ? -1 : 1;
    return 0;
}

/* The safetensors layer: header length, UTF-8, JSON, the value bounds, tensor entries and
 * tiling. Leaves the tensors in t (sorted by offset) and the metadata object in *meta. */
static int read_safetensors(ctx *c, cb_json *hj, const cb_jnode **meta_out, tensor *t, size_t *nt_out,
                            const uint8_t **body_out, size_t *body_len_out) {
    const uint8_t *d = c->data;
    size_t size = c->size, k, quotes = 0, containers = 0, nt = 0, bad;
    uint64_t n = 0, cursor = 0;
    const uint8_t *body;
    size_t body_len;
    const cb_jnode *root, *meta = NULL, *kn, *v;
    uint32_t idx;
    char why[128];
    int rc;

    if (size < 8) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "file is %lu bytes; a bundle starts with an 8-byte header length", (unsigned long)size);
        return COGBERT_ERR_FORMAT;
    }
    if (size > MAX_BUNDLE_BYTES) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "%lu bytes is over the %lu-byte bundle limit", (unsigned long)size,
                     (unsigned long)MAX_BUNDLE_BYTES);
        return COGBERT_ERR_FORMAT;
    }
    for (k = 0; k < 8; k++)
        n |= (uint64_t)d[k] << (8 * k);
    if (n > MAX_HEADER_BYTES) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "header length %llu is over the %u-byte limit", (unsigned long long)n, MAX_HEADER_BYTES);
        return COGBERT_ERR_FORMAT;
    }
    if (n > size - 8) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "header claims %llu bytes but only %lu follow the length field",
                     (unsigned long long)n, (unsigned long)(size - 8));
        return COGBERT_ERR_FORMAT;
    }
    if (n < 2 || n % 8) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "header length %llu is not a positive multiple of 8", (unsigned long long)n);
        return COGBERT_ERR_FORMAT;
    }
    bad = utf8_bad_at(d + 8, (size_t)n);
    if (bad != (size_t)n) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "header is not valid UTF-8 (byte %lu)", (unsigned long)bad);
        return COGBERT_ERR_FORMAT;
    }
    if (d[8] != '{') {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "header does not start with '{'");
        return COGBERT_ERR_FORMAT;
    }
    for (k = 0; k < (size_t)n; k++) {
        quotes += d[8 + k] == '"';
        containers += d[8 + k] == '{' || d[8 + k] == '[';
    }
    /* The same bound as the Python reader, so both refuse the same floods before parsing. */
    if (quotes > MAX_QUOTES || containers > MAX_CONTAINERS) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "header holds far more JSON values than any bundle has");
        return COGBERT_ERR_FORMAT;
    }
    rc = cb_json_parse(hj, (const char *)d + 8, (size_t)n, c->a, why, sizeof why);
    if (rc == -2) {
        cb_set_error(c->err, COGBERT_ERR_NO_MEMORY, "out of memory parsing the header");
        return COGBERT_ERR_NO_MEMORY;
    }
    if (rc < 0) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "header is not valid JSON: %s", why);
        return COGBERT_ERR_FORMAT;
    }
    root = cb_json_node(hj, 0);
    body = d + 8 + n;
    body_len = size - 8 - (size_t)n;

    /* First pass: __metadata__ and the tensor count. */
    for (k = 0, idx = root->off; k < root->len; k++, idx = v->next) {
        kn = cb_json_node(hj, idx);
        v = cb_json_node(hj, kn->next);
        if (cb_json_str_eq(hj, kn, "__metadata__"))
            meta = v;
    }
    if (meta && meta->type == CB_J_OBJ) {
        for (k = 0, idx = meta->off; k < meta->len; k++, idx = v->next) {
            v = cb_json_node(hj, cb_json_node(hj, idx)->next);
            if (v->type != CB_J_STR) {
                meta = NULL;
                break;
            }
        }
    }
    if (!meta || meta->type != CB_J_OBJ) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "__metadata__ is missing or not a map of strings");
        return COGBERT_ERR_FORMAT;
    }
    if (root->len - 1 > MAX_TENSORS) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "%lu tensors is over the limit of %d", (unsigned long)(root->len - 1), MAX_TENSORS);
        return COGBERT_ERR_FORMAT;
    }

    for (k = 0, idx = root->off; k < root->len; k++, idx = v->next) {
        static const char *const ekeys[] = {"dtype", "shape", "data_offsets"};
        const cb_jnode *dt, *shape, *offs, *it;
        tensor *x;
        uint64_t nbytes = 4;
        size_t r;
        uint32_t j;
        kn = cb_json_node(hj, idx);
        v = cb_json_node(hj, kn->next);
        if (cb_json_str_eq(hj, kn, "__metadata__"))
            continue;
        x = &t[nt++];
        x->name = cb_json_str(hj, kn);
        x->name_len = kn->len;
        if (!valid_tensor_name(x->name, x->name_len)) {
            cb_set_error(c->err, COGBERT_ERR_FORMAT, "invalid tensor name '%.64s'", x->name);
            return COGBERT_ERR_FORMAT;
        }
        if (!cb_json_keys_are(hj, v, ekeys, 3)) {
            cb_set_error(c->err, COGBERT_ERR_FORMAT, "tensor '%s': entry must have exactly dtype, shape, data_offsets", x->name);
            return COGBERT_ERR_FORMAT;
        }
        dt = cb_json_get(hj, v, "dtype");
        if (cb_json_str_eq(hj, dt, "F32"))
            x->dtype = DT_F32;
        else if (cb_json_str_eq(hj, dt, "U32"))
            x->dtype = DT_U32;
        else {
            cb_set_error(c->err, COGBERT_ERR_FORMAT, "tensor '%s': dtype is not F32 or U32", x->name);
            return COGBERT_ERR_FORMAT;
        }
        shape = cb_json_get(hj, v, "shape");
        if (shape->type != CB_J_ARR || shape->len > MAX_RANK) {
            cb_set_error(c->err, COGBERT_ERR_FORMAT, "tensor '%s': shape must be a list of at most %d non-negative integers", x->name, MAX_RANK);
            return COGBERT_ERR_FORMAT;
        }
        x->rank = shape->len;
        for (r = 0, j = shape->off; r < shape->len; r++, j = it->next) {
            it = cb_json_node(hj, j);
            if (!cb_json_uint(hj, it, UINT53 - 1, &x->shape[r])) {
                cb_set_error(c->err, COGBERT_ERR_FORMAT, "tensor '%s': shape must be a list of at most %d non-negative integers", x->name, MAX_RANK);
                return COGBERT_ERR_FORMAT;
            }
        }
        offs = cb_json_get(hj, v, "data_offsets");
        if (offs->type != CB_J_ARR || offs->len != 2 || !cb_json_uint(hj, cb_json_node(hj, offs->off), UINT53 - 1, &x->begin) ||
            !cb_json_uint(hj, cb_json_node(hj, cb_json_node(hj, offs->off)->next), UINT53 - 1, &x->end)) {
            cb_set_error(c->err, COGBERT_ERR_FORMAT, "tensor '%s': data_offsets must be two non-negative integers", x->name);
            return COGBERT_ERR_FORMAT;
        }
        if (!(x->begin <= x->end && x->end <= body_len)) {
            cb_set_error(c->err, COGBERT_ERR_FORMAT, "tensor '%s': data_offsets [%llu, %llu] lie outside the %lu-byte data section",
                         x->name, (unsigned long long)x->begin, (unsigned long long)x->end, (unsigned long)body_len);
            return COGBERT_ERR_FORMAT;
        }
        /* product(shape) * 4, saturating: anything above the data section cannot match. */
        for (r = 0; r < x->rank; r++) {
            if (x->shape[r] == 0) {
                nbytes = 0;
                break;
            }
        }
        for (r = 0; r < x->rank && nbytes; r++)
            nbytes = nbytes > (UINT64_MAX / 2) / x->shape[r] ? UINT64_MAX / 2 : nbytes * x->shape[r];
        if (x->end - x->begin != nbytes) {
            cb_set_error(c->err, COGBERT_ERR_FORMAT, "tensor '%s': shape needs %llu bytes, offsets give %llu", x->name,
                         (unsigned long long)nbytes, (unsigned long long)(x->end - x->begin));
            return COGBERT_ERR_FORMAT;
        }
    }
    qsort(t, nt, sizeof *t, cmp_span);
    for (k = 0; k < nt; k++) {
        if (t[k].begin != cursor) {
            cb_set_error(c->err, COGBERT_ERR_FORMAT, "tensor '%s' %s (offset %llu, expected %llu)", t[k].name,
                         t[k].begin < cursor ? "overlaps the previous tensor" : "leaves a gap before it",
                         (unsigned long long)t[k].begin, (unsigned long long)cursor);
            return COGBERT_ERR_FORMAT;
        }
        cursor = t[k].end;
    }
    if (cursor != body_len) {
        cb_set_error(c->err, COGBERT_ERR_FORMAT, "data section has %llu trailing bytes no tensor covers",
                     (unsigned long long)(body_len - cursor));
        return COGBERT_ERR_FORMAT;
    }
    *meta_out = meta;
    *nt_out = nt;
    *body_out = body;
    *body_len_out = body_len;
    return COGBERT_OK;
}

static int read_metadata(ctx *c, const cb_json *hj, const cb_jnode *meta, cb_bundle *b) {
    const cb_jnode *kn, *v;
    uint32_t idx;
    size_t k, m;
    for (m = 0; m < N_META; m++)
        if (!cb_json_get(hj, meta, META_KEYS[m])) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "metadata is missing ['%s']", META_KEYS[m]);
            return COGBERT_ERR_BUNDLE;
        }
    for (k = 0, idx = meta->off; k < meta->len; k++, idx = v->next) {
        kn = cb_json_node(hj, idx);
        v = cb_json_node(hj, kn->next);
        for (m = 0; m < N_META; m++)
            if (cb_json_str_eq(hj, kn, META_KEYS[m]))
                break;
        if (m == N_META && !(kn->len >= 2 && memcmp(cb_json_str(hj, kn), "x-", 2) == 0)) {
            cb_set_error(c->err, COGBERT_ERR_BUNDLE, "unknown metadata keys ['%.40s'] (free-form keys must start with 'x-')",
                         cb_json_str(hj, kn));
            return COGBERT_ERR_BUNDLE;
        }
    }
    if (!cb_json_str_eq(hj, cb_json_get(hj, meta, "format"), "cogbert-bundle")) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "not a Cogbert bundle (format '%.40s')", cb_json_str(hj, cb_json_get(hj, meta, "format")));
        return COGBERT_ERR_BUNDLE;
    }
    if (!cb_json_str_eq(hj, cb_json_get(hj, meta, "format_version"), "1")) {
        cb_set_error(c->err, COGBERT_ERR_VERSION, "bundle format version '%.16s' is not supported; this library reads version %d",
                     cb_json_str(hj, cb_json_get(hj, meta, "format_version")), COGBERT_FORMAT_VERSION);
        return COGBERT_ERR_VERSION;
    }
    if (!cb_json_str_eq(hj, cb_json_get(hj, meta, "architecture"), "lstm-ac")) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "unknown architecture '%.40s'; expected 'lstm-ac'",
                     cb_json_str(hj, cb_json_get(hj, meta, "architecture")));
        return COGBERT_ERR_BUNDLE;
    }
    v = cb_json_get(hj, meta, "model_id");
    if (!valid_model_id(cb_json_str(hj, v), v->len)) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "model_id '%.40s' must match [A-Za-z0-9_.-]{1,128}", cb_json_str(hj, v));
        return COGBERT_ERR_BUNDLE;
    }
    memcpy(b->model_id, cb_json_str(hj, v), v->len);
    b->model_id[v->len] = 0;
    v = cb_json_get(hj, meta, "parent");
    if (v->len && !valid_model_id(cb_json_str(hj, v), v->len)) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "parent '%.40s' must be empty or a model id", cb_json_str(hj, v));
        return COGBERT_ERR_BUNDLE;
    }
    v = cb_json_get(hj, meta, "created_at");
    if (!valid_created_at(cb_json_str(hj, v), v->len)) {
        cb_set_error(c->err, COGBERT_ERR_BUNDLE, "created_at '%.40s' is not an RFC 3339 UTC time (...Z)", cb_json_str(hj, v));
        return COGBERT_ERR_BUNDLE;
    }
    return COGBERT_OK;
}

int cb_bundle_parse(const uint8_t *data, size_t size, const cb_allocator *a, cb_bundle *b, cogbert_error *err) {
    ctx c;
    cb_json hj, cj, nj, qj;
    const cb_jnode *meta = NULL;
    tensor *t;
    size_t nt = 0, body_len = 0;
    const uint8_t *body = NULL;
    int rc;

    memset(b, 0, sizeof *b);
    memset(&hj, 0, sizeof hj);
    memset(&cj, 0, sizeof cj);
    memset(&nj, 0, sizeof nj);
    memset(&qj, 0, sizeof qj);
    c.a = a;
    c.err = err;
    c.data = data;
    c.size = size;
    t = (tensor *)cb_malloc(a, (MAX_TENSORS + 1) * sizeof *t);
    if (!t) {
        cb_set_error(err, COGBERT_ERR_NO_MEMORY, "out of memory");
        return COGBERT_ERR_NO_MEMORY;
    }
    rc = read_safetensors(&c, &hj, &meta, t, &nt, &body, &body_len);
    if (rc == COGBERT_OK)
        rc = read_metadata(&c, &hj, meta, b);
    if (rc == COGBERT_OK)
        rc = parse_inner(&c, &hj, meta, "normalization", &nj);
    if (rc == COGBERT_OK)
        rc = read_normalization(&c, &nj, b);
    if (rc == COGBERT_OK)
        rc = parse_inner(&c, &hj, meta, "config", &cj);
    if (rc == COGBERT_OK)
        rc = read_config(&c, &cj, b);
    if (rc == COGBERT_OK) {
        plan_layers(b);
        rc = parse_inner(&c, &hj, meta, "quantization", &qj);
    }
    if (rc == COGBERT_OK)
        rc = read_quantization(&c, &qj, b);
    if (rc == COGBERT_OK)
        rc = check_tensors(&c, b, t, nt, body);
    cb_json_free(&qj);
    cb_json_free(&cj);
    cb_json_free(&nj);
    cb_json_free(&hj);
    cb_free(a, t);
    (void)body_len;
    return rc;
}
