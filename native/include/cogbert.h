/*
 * cogbert.h: the Cogbert native runtime, a dependency-free C99 library that runs Cogbert
 * bundles (docs/bundle-format.md, format v1) on CPUs.
 *
 * Model of use:
 *
 *     cogbert_policy *p;  cogbert_state *s;  cogbert_error err;
 *     if (cogbert_open_file("model.safetensors", NULL, &p, &err) != COGBERT_OK) { puts(err.message); ... }
 *     cogbert_state_create(p, 1, &s);            // one per session (or per batch of sessions)
 *     for (;;) { cogbert_step(p, s, obs, logits, &value); ... }
 *     cogbert_state_destroy(s);  cogbert_close(p);
 *
 * Rules that hold for every function:
 *  - Every function returns an int status (COGBERT_OK = 0, or a COGBERT_ERR_* code) unless
 *    documented otherwise; cogbert_strerror() describes a code.
 *  - The caller owns every buffer it passes in, before and after the call. The library never
 *    keeps a pointer to a caller's buffer beyond the call that received it.
 *  - A policy is immutable after it is opened: any number of threads may use one policy at
 *    once, each with its own cogbert_state. A state must not be used by two threads at once.
 *  - Opening a policy and creating a state allocate (through the optional allocator); the
 *    decision path (cogbert_step, cogbert_step_batch, cogbert_forward, cogbert_decide,
 *    cogbert_sample) never allocates, never takes a lock and never writes global memory.
 *  - The library has no global state: nothing to initialise, nothing to clean up.
 */
#ifndef COGBERT_H
#define COGBERT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(COGBERT_BUILD_SHARED)
#define COGBERT_API __declspec(dllexport)
#elif defined(__GNUC__)
#define COGBERT_API __attribute__((visibility("default")))
#else
#define COGBERT_API
#endif

#define COGBERT_VERSION_MAJOR 0
#define COGBERT_VERSION_MINOR 1
#define COGBERT_VERSION_PATCH 0
/* The bundle format version this library reads (docs/bundle-format.md). */
#define COGBERT_FORMAT_VERSION 1

/* Status codes. Stable: new codes may be added, existing values never change. */
enum {
    COGBERT_OK = 0,
    COGBERT_ERR_ARGUMENT = 1,     /* a NULL pointer, a zero or too large batch, a state of another policy */
    COGBERT_ERR_NO_MEMORY = 2,    /* the allocator returned NULL */
    COGBERT_ERR_IO = 3,           /* the bundle file cannot be opened or read */
    COGBERT_ERR_FORMAT = 4,       /* the bytes are not a well-formed safetensors file (length, UTF-8, JSON, offsets) */
    COGBERT_ERR_VERSION = 5,      /* a Cogbert bundle of a format version this library does not read */
    COGBERT_ERR_BUNDLE = 6,       /* well-formed safetensors, but not a valid Cogbert bundle (metadata, config, tensors, values) */
    COGBERT_ERR_UNSUPPORTED = 7,  /* valid, but not runnable here: a kernel the CPU lacks, or a continuous-action call on a discrete model (or the reverse) */
    COGBERT_ERR_NONFINITE = 8     /* an observation holds NaN or +/-Inf; nothing was computed or changed */
};

/* Kernels. AUTO picks the fastest the CPU supports at open time: on x86-64 VNNI512, then AVX512,
 * VNNI, AVX2+FMA; NEON on arm64; else SCALAR. Forcing one is for tests and benchmarks.
 * SCALAR, AVX2, AVX512 and NEON quantize activations of int8/int4 layers to int16 (near-exact);
 * VNNI and VNNI512 to int8 (faster, within a looser stated bound). VNNI runs fp32 layers like
 * AVX2; AVX512 and VNNI512 use 512-bit registers for every layer, and give the same results as
 * AVX2 (fp32, int16 activations) and VNNI (int8 activations) bit for bit. */
enum {
    COGBERT_KERNEL_AUTO = 0,
    COGBERT_KERNEL_SCALAR = 1,
    COGBERT_KERNEL_AVX2 = 2,
    COGBERT_KERNEL_NEON = 3,
    COGBERT_KERNEL_VNNI = 4,
    COGBERT_KERNEL_SCALAR_INT8 = 5, /* portable C with VNNI's arithmetic (int8 activations): a test reference */
    COGBERT_KERNEL_AVX512 = 6,      /* AVX-512 F+BW: 512-bit fp32 FMAs and int16-activation products */
    COGBERT_KERNEL_VNNI512 = 7      /* AVX-512 VNNI: 512-bit fp32 FMAs and vpdpbusd on int8 activations */
};

enum { COGBERT_ACTION_DISCRETE = 0, COGBERT_ACTION_CONTINUOUS = 1 };
enum { COGBERT_LOG_ERROR = 0, COGBERT_LOG_INFO = 1 };

/* Allocator: alloc(ctx, size) returns memory aligned for any C type, or NULL; free(ctx, p)
 * accepts NULL. Both are called only from cogbert_open_*, cogbert_close, cogbert_state_create
 * and cogbert_state_destroy. */
typedef void *(*cogbert_alloc_fn)(void *ctx, size_t size);
typedef void (*cogbert_free_fn)(void *ctx, void *ptr);
/* Log sink: called from cogbert_open_* only (why a bundle was rejected, which kernel runs).
 * The message is valid during the call only. */
typedef void (*cogbert_log_fn)(void *ctx, int level, const char *message);

typedef struct cogbert_options {
    cogbert_alloc_fn alloc;   /* NULL: malloc/free. Set both or neither. */
    cogbert_free_fn free;
    void *alloc_ctx;
    cogbert_log_fn log;       /* NULL: silent */
    void *log_ctx;
    int kernel;               /* COGBERT_KERNEL_*; 0 = AUTO */
} cogbert_options;

/* Why an open failed, in words that name the problem (e.g. "tensor 'lstm.hh.weight' has shape
 * [1024, 128]; the config implies [1024, 256]"). Filled by cogbert_open_* when non-NULL. */
typedef struct cogbert_error {
    int status;
    char message[256];
} cogbert_error;

typedef struct cogbert_info {
    size_t obs_dim;
    size_t hidden;
    size_t action_size;           /* number of actions (discrete) or dimensions (continuous) */
    int action_kind;              /* COGBERT_ACTION_* */
    size_t encoder_layers;
    float obs_clip;               /* 0: no clipping */
    int kernel;                   /* the COGBERT_KERNEL_* in use (never AUTO) */
    int weight_bits;              /* 32, 8 or 4 for the LSTM's input layer (the bulk of the model) */
    size_t macs_per_step;         /* multiply-adds of one decision */
    size_t policy_bytes;          /* memory the open policy holds (weights in kernel layout included) */
    size_t state_bytes_per_row;   /* memory a state adds per batch row (h, c and scratch) */
} cogbert_info;

/* ---- library ------------------------------------------------------------------------- */

/* (major << 16) | (minor << 8) | patch of the library actually linked. */
COGBERT_API uint32_t cogbert_version(void);
/* "0.1.0"; a static string. */
COGBERT_API const char *cogbert_version_string(void);
/* A static English description of a status code; never NULL (unknown codes get a generic text). */
COGBERT_API const char *cogbert_strerror(int status);
/* The COGBERT_KERNEL_* that AUTO selects on this CPU with this build. */
COGBERT_API int cogbert_best_kernel(void);
/* Fill *options with the defaults (malloc, no log, kernel AUTO). */
COGBERT_API void cogbert_options_init(cogbert_options *options);

/* ---- policy -------------------------------------------------------------------------- */

typedef struct cogbert_policy cogbert_policy;   /* an open bundle: immutable, shareable across threads */
typedef struct cogbert_state cogbert_state;     /* recurrent state (h, c) of 1..max_batch sessions, plus scratch */

/* Validate a bundle held in memory and open it. The library reads data[0..size) during the
 * call only and copies what it needs (weights repacked for the kernels), so the caller may free
 * or reuse the buffer as soon as this returns. On success *policy_out is a new policy that the
 * caller owns and releases with cogbert_close; on failure *policy_out is NULL and, when error is
 * non-NULL, error->message names the problem. options may be NULL (defaults).
 * Checks: everything docs/bundle-format.md section 6 lists, exactly as the Python reader does. */
COGBERT_API int cogbert_open_buffer(const void *data, size_t size, const cogbert_options *options,
                                    cogbert_policy **policy_out, cogbert_error *error);
/* The same for a file path; the file is read once and not kept open. */
COGBERT_API int cogbert_open_file(const char *path, const cogbert_options *options,
                                  cogbert_policy **policy_out, cogbert_error *error);
/* Release a policy and everything it owns. NULL is a no-op. Every state created from it must be
 * destroyed first or never used again. */
COGBERT_API void cogbert_close(cogbert_policy *policy);

/* Describe the model. *info is the caller's. */
COGBERT_API int cogbert_get_info(const cogbert_policy *policy, cogbert_info *info);
/* The bundle's model_id; the string is owned by the policy and lives until cogbert_close. */
COGBERT_API const char *cogbert_model_id(const cogbert_policy *policy);
/* Copy policy.log_std (continuous actions only; action_size floats) into the caller's buffer. */
COGBERT_API int cogbert_get_log_std(const cogbert_policy *policy, float *log_std_out);

/* ---- state --------------------------------------------------------------------------- */

/* A zeroed state for up to max_batch sessions (rows), holding h and c [max_batch][hidden] and the
 * scratch a step needs, so that stepping never allocates. The caller owns it; release it with
 * cogbert_state_destroy before closing its policy. */
COGBERT_API int cogbert_state_create(const cogbert_policy *policy, size_t max_batch, cogbert_state **state_out);
/* Release a state. NULL is a no-op. */
COGBERT_API void cogbert_state_destroy(cogbert_state *state);
/* Zero h and c of every row (the start of new sessions). */
COGBERT_API int cogbert_state_reset(cogbert_state *state);
/* Zero h and c of one row. */
COGBERT_API int cogbert_state_reset_row(cogbert_state *state, size_t row);
/* Copy h and c of src's rows into dst (same policy; dst->max_batch >= src->max_batch). */
COGBERT_API int cogbert_state_copy(cogbert_state *dst, const cogbert_state *src);
/* Copy h and/or c of the first `rows` rows out to / in from caller buffers [rows][hidden].
 * Either pointer may be NULL to skip it. */
COGBERT_API int cogbert_state_get(const cogbert_state *state, size_t rows, float *h_out, float *c_out);
COGBERT_API int cogbert_state_set(cogbert_state *state, size_t rows, const float *h, const float *c);
COGBERT_API size_t cogbert_state_max_batch(const cogbert_state *state);

/* ---- decisions ----------------------------------------------------------------------- */

/* One decision for row 0 of state: obs [obs_dim] -> head [action_size] (logits, or the Gaussian
 * mean), *value; h and c of row 0 advance. head_out and value_out may be NULL.
 * Returns COGBERT_ERR_NONFINITE, changing nothing, if obs holds NaN or Inf. */
COGBERT_API int cogbert_step(const cogbert_policy *policy, cogbert_state *state, const float *obs,
                             float *head_out, float *value_out);
/* Decisions for rows 0..batch-1: obs [batch][obs_dim] -> head [batch][action_size],
 * value [batch]. Row i's result equals cogbert_step on that row alone, bit for bit. */
COGBERT_API int cogbert_step_batch(const cogbert_policy *policy, cogbert_state *state, size_t batch,
                                   const float *obs, float *head_out, float *value_out);
/* The step as a pure function of caller buffers: h_in, c_in [batch][hidden] -> h_out, c_out.
 * `workspace` is any state of this policy with max_batch >= batch; only its scratch is used (its
 * h and c are untouched). h_out may equal h_in and c_out may equal c_in (in-place update); no
 * other overlap is allowed. Used by the Python binding, whose states are numpy arrays. */
COGBERT_API int cogbert_forward(const cogbert_policy *policy, cogbert_state *workspace, size_t batch,
                                const float *obs, const float *h_in, const float *c_in,
                                float *head_out, float *value_out, float *h_out, float *c_out);

/* Sample a discrete action from logits [n] with a uniform number u in [0, 1): the inverse-CDF
 * rule of the Python SDK (exact, double precision): w_k = exp(l_k - max l), total = exactly
 * rounded sum of w, the first k with u * total < w_0 + ... + w_k (else n - 1).
 * *log_prob_out = l_a - max l - log(total). Returns COGBERT_ERR_NONFINITE if a logit is NaN/Inf. */
COGBERT_API int cogbert_sample(const float *logits, size_t n, double u, int32_t *action_out,
                               double *log_prob_out);
/* Index of the largest logit (the first one on ties); a deterministic decision. */
COGBERT_API int cogbert_argmax(const float *logits, size_t n, int32_t *action_out);

/* One whole discrete decision for row 0: step, then sample with u (or take the argmax when
 * deterministic != 0, with *log_prob_out = 0). Any output pointer may be NULL.
 * Returns COGBERT_ERR_UNSUPPORTED for continuous-action models. */
COGBERT_API int cogbert_decide(const cogbert_policy *policy, cogbert_state *state, const float *obs,
                               double u, int deterministic, int32_t *action_out,
                               double *log_prob_out, float *value_out);

#ifdef __cplusplus
}
#endif

#endif /* COGBERT_H */
