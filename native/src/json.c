/* A strict, bounded JSON parser for bundle headers and the JSON documents inside metadata.
 *
 * It must accept exactly what the reference reader (Python's json.loads with a duplicate-key
 * hook and NaN/Infinity refused) accepts, so its grammar is Python's C scanner: RFC 8259 values,
 * whitespace " \t\n\r", strings without raw control characters (< 0x20), \uXXXX escapes where a
 * high surrogate followed by a low one combines and lone surrogates are kept (we store them as
 * 3-byte WTF-8 so that key comparison still means code point comparison).
 *
 * Bounds: two passes over the text, the first only counts, so the node array and the string
 * arena are allocated once at their exact sizes (at most 8 bytes of nodes per byte of text, and
 * the strings never exceed the text). Nesting deeper than CB_JSON_MAX_DEPTH is refused, which
 * keeps the recursion bounded; no valid bundle nests deeper than 4.
 */
#include "internal.h"

#include <locale.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const unsigned char *s;
    size_t n, i;
    int depth;
    int build;                 /* 0: count only; 1: fill nodes and strings */
    cb_jnode *nodes;
    uint32_t count;
    char *str;
    size_t nstr;
    char *why;
    size_t why_len;
} jp;

static int fail(jp *p, const char *what) {
    if (p->why && p->why_len)
        snprintf(p->why, p->why_len, "%s at character %lu", what, (unsigned long)p->i);
    return -1;
}

static void skip_ws(jp *p) {
    while (p->i < p->n) {
        unsigned char c = p->s[p->i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        p->i++;
    }
}

static int new_node(jp *p, uint8_t type, uint32_t *index) {
    if (p->count == UINT32_MAX)
        return fail(p, "too many JSON values");
    *index = p->count;
    if (p->build) {
        cb_jnode *nd = &p->nodes[p->count];
        memset(nd, 0, sizeof *nd);
        nd->type = type;
    }
    p->count++;
    return 0;
}

static int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int hex4(const unsigned char *s, size_t avail, unsigned long *out) {
    unsigned long v = 0;
    size_t k;
    if (avail < 4)
        return -1;
    for (k = 0; k < 4; k++) {
        int h = hexval(s[k]);
        if (h < 0)
            return -1;
        v = (v << 4) | (unsigned long)h;
    }
    *out = v;
    return 0;
}

static void put(jp *p, unsigned char c) {
    if (p->build)
        p->str[p->nstr] = (char)c;
    p->nstr++;
}

static void put_cp(jp *p, unsigned long cp) {
    if (cp < 0x80) {
        put(p, (unsigned char)cp);
    } else if (cp < 0x800) {
        put(p, (unsigned char)(0xC0 | (cp >> 6)));
        put(p, (unsigned char)(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {  /* lone surrogates too: WTF-8 */
        put(p, (unsigned char)(0xE0 | (cp >> 12)));
        put(p, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put(p, (unsigned char)(0x80 | (cp & 0x3F)));
    } else {
        put(p, (unsigned char)(0xF0 | (cp >> 18)));
        put(p, (unsigned char)(0x80 | ((cp >> 12) & 0x3F)));
        put(p, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put(p, (unsigned char)(0x80 | (cp & 0x3F)));
    }
}

/* At the opening quote. Bytes >= 0x80 are copied as they are: the caller validated the header
 * as UTF-8, and strings decoded from it are WTF-8 by construction. */
static int parse_string(jp *p, uint32_t *index) {
    size_t start;
    if (new_node(p, CB_J_STR, index) < 0)
        return -1;
    p->i++;
    start = p->nstr;
    for (;;) {
        unsigned char c;
        if (p->i >= p->n)
            return fail(p, "unterminated string");
        c = p->s[p->i];
        if (c == '"') {
            p->i++;
            break;
        }
        if (c < 0x20)
            return fail(p, "invalid control character in string");
        if (c != '\\') {
            put(p, c);
            p->i++;
            continue;
        }
        if (p->i + 1 >= p->n)
            return fail(p, "unterminated string");
        c = p->s[p->i + 1];
        p->i += 2;
        switch (c) {
        case '"': put(p, '"'); break;
        case '\\': put(p, '\\'); break;
        case '/': put(p, '/'); break;
        case 'b': put(p, '\b'); break;
        case 'f': put(p, '\f'); break;
        case 'n': put(p, '\n'); break;
        case 'r': put(p, '\r'); break;
        case 't': put(p, '\t'); break;
        case 'u': {
            unsigned long cp, lo;
            if (hex4(p->s + p->i, p->n - p->i, &cp) < 0)
                return fail(p, "invalid \\uXXXX escape");
            p->i += 4;
            /* Python combines a high surrogate with an immediately following escaped low one. */
            if (cp >= 0xD800 && cp <= 0xDBFF && p->n - p->i >= 6 && p->s[p->i] == '\\' &&
                p->s[p->i + 1] == 'u' && hex4(p->s + p->i + 2, p->n - p->i - 2, &lo) == 0 &&
                lo >= 0xDC00 && lo <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p->i += 6;
            }
            put_cp(p, cp);
            break;
        }
        default:
            p->i -= 1;
            return fail(p, "invalid escape in string");
        }
    }
    if (p->build) {
        p->nodes[*index].off = (uint32_t)start;
        p->nodes[*index].len = (uint32_t)(p->nstr - start);
    }
    put(p, 0);
    return 0;
}

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int parse_number(jp *p, uint32_t *index) {
    size_t start = p->i;
    int is_int = 1;
    if (p->s[p->i] == '-')
        p->i++;
    if (p->i >= p->n)
        return fail(p, "expecting a value");
    if (p->s[p->i] == '0') {
        p->i++;
    } else if (p->s[p->i] >= '1' && p->s[p->i] <= '9') {
        while (p->i < p->n && is_digit(p->s[p->i]))
            p->i++;
    } else {
        return fail(p, "expecting a value");
    }
    if (p->i + 1 < p->n && p->s[p->i] == '.' && is_digit(p->s[p->i + 1])) {
        is_int = 0;
        p->i += 2;
        while (p->i < p->n && is_digit(p->s[p->i]))
            p->i++;
    }
    if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        size_t e = p->i + 1;
        if (e < p->n && (p->s[e] == '+' || p->s[e] == '-'))
            e++;
        if (e < p->n && is_digit(p->s[e])) {
            while (e < p->n && is_digit(p->s[e]))
                e++;
            p->i = e;
            is_int = 0;
        }
        /* else: like Python, the exponent is not part of the number and the 'e' is an error
         * wherever the next token is expected. */
    }
    if (new_node(p, CB_J_NUM, index) < 0)
        return -1;
    if (p->build) {
        p->nodes[*index].off = (uint32_t)start;
        p->nodes[*index].len = (uint32_t)(p->i - start);
        p->nodes[*index].is_int = (uint8_t)is_int;
    }
    return 0;
}

static int parse_value(jp *p, uint32_t *index);

static int keys_equal(const jp *p, uint32_t a, uint32_t b) {
    const cb_jnode *x = &p->nodes[a], *y = &p->nodes[b];
    return x->len == y->len && memcmp(p->str + x->off, p->str + y->off, x->len) == 0;
}

static int parse_container(jp *p, uint32_t *index, int object) {
    uint32_t self, prev = 0, first = 0, n = 0;
    if (++p->depth > CB_JSON_MAX_DEPTH)
        return fail(p, "JSON nested too deeply");
    if (new_node(p, object ? CB_J_OBJ : CB_J_ARR, &self) < 0)
        return -1;
    p->i++;
    skip_ws(p);
    if (p->i < p->n && p->s[p->i] == (object ? '}' : ']')) {
        p->i++;
    } else {
        for (;;) {
            uint32_t k = 0, v;
            skip_ws(p);
            if (object) {
                if (p->i >= p->n || p->s[p->i] != '"')
                    return fail(p, "expecting a property name in double quotes");
                if (parse_string(p, &k) < 0)
                    return -1;
                skip_ws(p);
                if (p->i >= p->n || p->s[p->i] != ':')
                    return fail(p, "expecting ':' delimiter");
                p->i++;
                skip_ws(p);
            }
            if (parse_value(p, &v) < 0)
                return -1;
            if (p->build) {
                uint32_t head = object ? k : v;
                if (n == 0)
                    first = head;
                else
                    p->nodes[prev].next = head;
                if (object)
                    p->nodes[k].next = v;
                prev = v;
                if (object) {
                    /* Duplicate keys are an error at every depth, compared as decoded strings. */
                    uint32_t it = first;
                    while (it != k) {
                        if (keys_equal(p, it, k))
                            return fail(p, "duplicate key in JSON object");
                        it = p->nodes[p->nodes[it].next].next;
                    }
                }
            }
            n++;
            skip_ws(p);
            if (p->i >= p->n)
                return fail(p, "unterminated JSON container");
            if (p->s[p->i] == ',') {
                p->i++;
                continue;
            }
            if (p->s[p->i] == (object ? '}' : ']')) {
                p->i++;
                break;
            }
            return fail(p, object ? "expecting ',' or '}'" : "expecting ',' or ']'");
        }
    }
    if (p->build) {
        p->nodes[self].len = n;
        p->nodes[self].off = first;
    }
    p->depth--;
    *index = self;
    return 0;
}

static int literal(jp *p, const char *word, uint8_t type, uint32_t *index) {
    size_t len = strlen(word);
    if (p->n - p->i < len || memcmp(p->s + p->i, word, len) != 0)
        return fail(p, "expecting a value");
    p->i += len;
    return new_node(p, type, index);
}

static int parse_value(jp *p, uint32_t *index) {
    unsigned char c;
    if (p->i >= p->n)
        return fail(p, "expecting a value");
    c = p->s[p->i];
    switch (c) {
    case '{': return parse_container(p, index, 1);
    case '[': return parse_container(p, index, 0);
    case '"': return parse_string(p, index);
    case 't': return literal(p, "true", CB_J_TRUE, index);
    case 'f': return literal(p, "false", CB_J_FALSE, index);
    case 'n': return literal(p, "null", CB_J_NULL, index);
    default:
        if (c == '-' || is_digit(c))
            return parse_number(p, index);
        /* NaN, Infinity, -Infinity land here (or in parse_number) and are refused. */
        return fail(p, "expecting a value");
    }
}

static int run(jp *p) {
    uint32_t root;
    p->i = 0;
    p->depth = 0;
    p->count = 0;
    p->nstr = 0;
    skip_ws(p);
    if (parse_value(p, &root) < 0)
        return -1;
    skip_ws(p);
    if (p->i != p->n)
        return fail(p, "extra data after the JSON value");
    return 0;
}

int cb_json_parse(cb_json *out, const char *text, size_t len, const cb_allocator *a, char *why, size_t why_len) {
    jp p;
    memset(out, 0, sizeof *out);
    memset(&p, 0, sizeof p);
    p.s = (const unsigned char *)text;
    p.n = len;
    p.why = why;
    p.why_len = why_len;
    if (len >= UINT32_MAX)
        return fail(&p, "JSON text too long");
    if (run(&p) < 0)
        return -1;
    p.nodes = (cb_jnode *)cb_malloc(a, (size_t)p.count * sizeof(cb_jnode));
    p.str = (char *)cb_malloc(a, p.nstr + 1);
    if (!p.nodes || !p.str) {
        cb_free(a, p.nodes);
        cb_free(a, p.str);
        if (why && why_len)
            snprintf(why, why_len, "out of memory parsing JSON");
        return -2;
    }
    p.build = 1;
    if (run(&p) < 0) {
        cb_free(a, p.nodes);
        cb_free(a, p.str);
        return -1;
    }
    out->nodes = p.nodes;
    out->count = p.count;
    out->strings = p.str;
    out->src = text;
    out->src_len = len;
    out->alloc = a;
    return 0;
}

void cb_json_free(cb_json *j) {
    if (!j->alloc)
        return;
    cb_free(j->alloc, j->nodes);
    cb_free(j->alloc, j->strings);
    j->nodes = NULL;
    j->strings = NULL;
}

const cb_jnode *cb_json_node(const cb_json *j, uint32_t index) {
    return index < j->count ? &j->nodes[index] : NULL;
}

const cb_jnode *cb_json_get(const cb_json *j, const cb_jnode *obj, const char *key) {
    uint32_t it, k;
    if (!obj || obj->type != CB_J_OBJ || obj->len == 0)
        return NULL;
    for (it = obj->off, k = 0; k < obj->len; k++) {
        const cb_jnode *kn = &j->nodes[it];
        if (cb_json_str_eq(j, kn, key))
            return &j->nodes[kn->next];
        it = j->nodes[kn->next].next;
    }
    return NULL;
}

int cb_json_keys_are(const cb_json *j, const cb_jnode *obj, const char *const *keys, size_t n) {
    size_t k;
    if (!obj || obj->type != CB_J_OBJ || obj->len != n)
        return 0;
    /* Keys are unique (duplicates were refused), so n members all found means the same set. */
    for (k = 0; k < n; k++)
        if (!cb_json_get(j, obj, keys[k]))
            return 0;
    return 1;
}

int cb_json_str_eq(const cb_json *j, const cb_jnode *n, const char *s) {
    size_t len = strlen(s);
    return n && n->type == CB_J_STR && n->len == len && memcmp(j->strings + n->off, s, len) == 0;
}

const char *cb_json_str(const cb_json *j, const cb_jnode *n) {
    return j->strings + n->off;
}

int cb_json_uint(const cb_json *j, const cb_jnode *n, uint64_t max, uint64_t *out) {
    const char *s;
    size_t len, k;
    uint64_t v = 0;
    if (!n || n->type != CB_J_NUM || !n->is_int)
        return 0;
    s = j->src + n->off;
    len = n->len;
    if (s[0] == '-')
        return len == 2 && s[1] == '0' ? (*out = 0, 1) : 0;
    for (k = 0; k < len; k++) {
        unsigned d = (unsigned)(s[k] - '0');
        if (v > (max - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

int cb_json_double(const cb_json *j, const cb_jnode *n, double *out) {
    char small[80], *buf = small, *end;
    const char *point;
    size_t k, len;
    if (!n || n->type != CB_J_NUM)
        return 0;
    len = n->len;
    if (len + 1 > sizeof small) {
        buf = (char *)cb_malloc(j->alloc, len + 1);
        if (!buf)
            return 0;
    }
    memcpy(buf, j->src + n->off, len);
    buf[len] = 0;
    /* strtod follows LC_NUMERIC; a host application may have set a locale whose decimal point
     * is not '.'. JSON's is always '.', so write the locale's into the copy. */
    point = localeconv()->decimal_point;
    if (point && point[0] && point[0] != '.' && point[1] == 0)
        for (k = 0; k < len; k++)
            if (buf[k] == '.')
                buf[k] = point[0];
    *out = strtod(buf, &end);
    if (buf != small)
        cb_free(j->alloc, buf);
    return 1;
}
