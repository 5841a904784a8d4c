/* The allocator every other file allocates through: the caller's (cogbert_options) or malloc,
 * with 64-byte alignment added here, and overflow-checked sizes. Depends on nothing but libc, so
 * the bundle reader and the JSON parser can use it without linking the rest of the library. */
#include "internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
void cb_allocator_from(const cogbert_options *o, cb_allocator *a) {
    a->alloc = o && o->alloc ? o->alloc : default_alloc;
    a->free = o && o->alloc ? o->free : default_free;
    a->ctx = o ? o->alloc_ctx : NULL;
}

void *cb_malloc(const cb_allocator *a, size_t size) {
    unsigned char *raw, *p;
    if (size > (size_t)-1 - CB_ALIGN - sizeof(void *))
        return NULL;
    raw = (unsigned char *)a->alloc(a->ctx, size + CB_ALIGN + sizeof(void *));
    if (!raw)
        return NULL;
    p = raw + sizeof(void *);
    p += (CB_ALIGN - (size_t)((uintptr_t)p % CB_ALIGN)) % CB_ALIGN;
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
