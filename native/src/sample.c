/* Choosing a discrete action from logits: the SDK's exact inverse-CDF sampling, and argmax. */
#include "internal.h"

#include <math.h>
#include <string.h>

/* 1 when no element is NaN or +/-Inf. Branch-free over the bits, so a long observation costs
 * one pass whatever it holds. */
int cb_all_finite(const float *x, size_t n) {
    size_t k;
    uint32_t bad = 0;
    for (k = 0; k < n; k++) {
        uint32_t u;
        memcpy(&u, x + k, sizeof u);
        bad |= (uint32_t)((u & 0x7F800000u) == 0x7F800000u);
    }
    return !bad;
}

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
    if (!cb_all_finite(logits, n))
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
