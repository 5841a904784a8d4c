/* _cogbert_native: the CPython binding of the Cogbert native runtime, used by
 * cogbert_edge/backends/native_backend.py. Not a public API.
 *
 * Why a C extension and not ctypes: measured on the test machine, a ctypes call passing five
 * numpy arrays costs about 6.3 us (each arr.ctypes.data alone is ~1 us), the same call through
 * this module about 0.2 us (buffer protocol, METH_FASTCALL). The decision itself takes ~8 us,
 * so ctypes would nearly double it. The library stays dependency-free; only this file needs
 * Python.h (and no numpy headers: arrays come in through the buffer protocol, without copies).
 *
 * Threads: a policy is immutable; scratch comes from a small pool of workspaces taken and given
 * back under the GIL, so no allocation happens in steady state. Single decisions (~8 us) keep the
 * GIL: releasing and re-taking it would cost more than the step under contention. Batches of at
 * least GIL_RELEASE_MIN_MACS of work release it so other threads run meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "cogbert.h"

#include <string.h>

#define POOL 4
#define GIL_RELEASE_MIN_MACS 4000000u

typedef struct {
    PyObject_HEAD
    cogbert_policy *p;
    cogbert_info info;
    cogbert_state *pool[POOL];
    int n_pool;
    /* Set by bind(): the SDK's State and Decision classes and numpy.empty, so act() returns a
     * finished Decision without a Python frame in between; and the int64 / float64 dtypes
     * act_batch() returns actions and log-probabilities in. */
    PyObject *state_type, *decision_type, *empty, *empty_args, *f32, *i64, *f64;
    /* act_batch's logits, grown to the largest batch seen (no allocation in steady state). */
    float *heads;
    size_t heads_rows;
    /* Benchmarks only (set_null_step): skip the C step, so a call measures the binding alone. */
    int null_step;
} NativePolicy;

static PyObject *NativeError;
static PyObject *random_name, *h_name, *c_name, *action_name, *log_prob_name, *value_name, *state_name, *empty_tuple;

static PyObject *raise_status(int status, const char *message) {
    /* Messages quote bundle bytes, cut to a length that may split a UTF-8 sequence. */
    const char *m = message && message[0] ? message : cogbert_strerror(status);
    PyObject *text = PyUnicode_DecodeUTF8(m, (Py_ssize_t)strlen(m), "replace"), *args;
    if (!text)
        return NULL;
    args = Py_BuildValue("(iN)", status, text);
    if (args) {
        PyErr_SetObject(NativeError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static cogbert_state *take(NativePolicy *self, size_t batch) {
    int k;
    cogbert_state *s = NULL;
    for (k = self->n_pool - 1; k >= 0; k--) {
        if (cogbert_state_max_batch(self->pool[k]) >= batch) {
            s = self->pool[k];
            self->pool[k] = self->pool[--self->n_pool];
            return s;
        }
    }
    if (cogbert_state_create(self->p, batch, &s) != COGBERT_OK) {
        PyErr_NoMemory();
        return NULL;
    }
    return s;
}

static void give_back(NativePolicy *self, cogbert_state *s) {
    if (self->n_pool < POOL) {
        self->pool[self->n_pool++] = s;
        return;
    }
    cogbert_state_destroy(s);
}

static int get_f32(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    if (view->itemsize != 4 || !view->format || !(strcmp(view->format, "f") == 0 || strcmp(view->format, "<f") == 0 ||
                                                  strcmp(view->format, "=f") == 0)) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous float32 buffer", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* A 1-D contiguous float32 array of n elements, or 0 (error cleared): decide() then returns
 * None and the caller takes the general path, which converts or reports the problem. */
static int get_vec(PyObject *obj, Py_buffer *view, int writable, size_t n) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (view->ndim == 1 && view->shape && (size_t)view->shape[0] == n && view->itemsize == 4 && view->format &&
        (strcmp(view->format, "f") == 0 || strcmp(view->format, "<f") == 0 || strcmp(view->format, "=f") == 0))
        return 1;
    PyBuffer_Release(view);
    return 0;
}

static void release(Py_buffer *v, int n) {
    int k;
    for (k = 0; k < n; k++)
        PyBuffer_Release(&v[k]);
}

/* 1 when no value is NaN or +/-Inf (x - x is 0 exactly for finite x). */
static int cb_finite(const float *x, size_t n) {
    size_t k;
    for (k = 0; k < n; k++)
        if (x[k] - x[k] != 0.0f)
            return 0;
    return 1;
}

static int NativePolicy_init(NativePolicy *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"data", "kernel", NULL};
    Py_buffer data;
    int kernel = COGBERT_KERNEL_AUTO, rc;
    cogbert_options o;
    cogbert_error err;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|i", kwlist, &data, &kernel))
        return -1;
    if (self->p) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "already initialised");
        return -1;
    }
    cogbert_options_init(&o);
    o.kernel = kernel;
    Py_BEGIN_ALLOW_THREADS
    rc = cogbert_open_buffer(data.buf, (size_t)data.len, &o, &self->p, &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (rc != COGBERT_OK) {
        raise_status(rc, err.message);
        return -1;
    }
    cogbert_get_info(self->p, &self->info);
    return 0;
}

static void NativePolicy_dealloc(NativePolicy *self) {
    int k;
    Py_XDECREF(self->state_type);
    Py_XDECREF(self->decision_type);
    Py_XDECREF(self->empty);
    Py_XDECREF(self->empty_args);
    Py_XDECREF(self->f32);
    Py_XDECREF(self->i64);
    Py_XDECREF(self->f64);
    PyMem_Free(self->heads);
    for (k = 0; k < self->n_pool; k++)
        cogbert_state_destroy(self->pool[k]);
    cogbert_close(self->p);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *NativePolicy_info(NativePolicy *self, PyObject *unused) {
    const cogbert_info *i = &self->info;
    (void)unused;
    if (!self->p)
        return raise_status(COGBERT_ERR_ARGUMENT, "policy not open");
    return Py_BuildValue("{s:n,s:n,s:n,s:i,s:n,s:f,s:i,s:i,s:n,s:n,s:n,s:s}", "obs_dim", (Py_ssize_t)i->obs_dim, "hidden",
                         (Py_ssize_t)i->hidden, "action_size", (Py_ssize_t)i->action_size, "action_kind", i->action_kind,
                         "encoder_layers", (Py_ssize_t)i->encoder_layers, "obs_clip", (double)i->obs_clip, "kernel",
                         i->kernel, "weight_bits", i->weight_bits, "macs_per_step", (Py_ssize_t)i->macs_per_step,
                         "policy_bytes", (Py_ssize_t)i->policy_bytes, "state_bytes_per_row",
                         (Py_ssize_t)i->state_bytes_per_row, "model_id", cogbert_model_id(self->p));
}

/* cogbert_forward, or with null_step set the same outputs without the model: head and value
 * zero, h and c carried over. What remains of a call's time is the binding's own. */
static int run_forward(NativePolicy *self, cogbert_state *ws, size_t batch, const float *obs, const float *h,
                       const float *c, float *head, float *value, float *h_out, float *c_out) {
    const size_t H = self->info.hidden;
    if (!self->null_step)
        return cogbert_forward(self->p, ws, batch, obs, h, c, head, value, h_out, c_out);
    if (head)
        memset(head, 0, batch * self->info.action_size * sizeof(float));
    if (value)
        memset(value, 0, batch * sizeof(float));
    if (h_out != h)
        memcpy(h_out, h, batch * H * sizeof(float));
    if (c_out != c)
        memcpy(c_out, c, batch * H * sizeof(float));
    return COGBERT_OK;
}

/* forward(obs, h, c, head, value, h_out, c_out): the step for a batch, into caller arrays. */
static PyObject *NativePolicy_forward(NativePolicy *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *names[7] = {"obs", "h", "c", "head", "value", "h_out", "c_out"};
    Py_buffer v[7];
    const cogbert_info *in = &self->info;
    size_t batch, want[7];
    cogbert_state *ws;
    int k, rc;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "forward takes 7 arrays");
        return NULL;
    }
    if (!self->p)
        return raise_status(COGBERT_ERR_ARGUMENT, "policy not open");
    for (k = 0; k < 7; k++) {
        if (get_f32(args[k], &v[k], k >= 3, names[k]) < 0) {
            release(v, k);
            return NULL;
        }
    }
    batch = (size_t)v[0].len / 4 / in->obs_dim;
    want[0] = batch * in->obs_dim;
    want[1] = want[2] = want[5] = want[6] = batch * in->hidden;
    want[3] = batch * in->action_size;
    want[4] = batch;
    for (k = 0; k < 7; k++) {
        if (batch == 0 || (size_t)v[k].len != 4 * want[k]) {
            release(v, 7);
            return raise_status(COGBERT_ERR_ARGUMENT, "array sizes do not match the model and batch");
        }
    }
    ws = take(self, batch);
    if (!ws) {
        release(v, 7);
        return NULL;
    }
    if (batch * in->macs_per_step >= GIL_RELEASE_MIN_MACS) {
        Py_BEGIN_ALLOW_THREADS
        rc = run_forward(self, ws, batch, v[0].buf, v[1].buf, v[2].buf, v[3].buf, v[4].buf, v[5].buf, v[6].buf);
        Py_END_ALLOW_THREADS
    } else {
        rc = run_forward(self, ws, batch, v[0].buf, v[1].buf, v[2].buf, v[3].buf, v[4].buf, v[5].buf, v[6].buf);
    }
    give_back(self, ws);
    release(v, 7);
    if (rc != COGBERT_OK)
        return raise_status(rc, NULL);
    Py_RETURN_NONE;
}

/* The step and the choice on already-checked buffers v = obs, h, c, h_out, c_out (released here).
 * Returns (action, log_prob, value), None for the Python path, or NULL with an exception. */
static PyObject *decide_core(NativePolicy *self, Py_buffer *v, int det, PyObject *rng) {
    const cogbert_info *in = &self->info;
    cogbert_state *ws;
    float head[64], value;
    int32_t action = 0;
    double logp = 0.0, u = 0.0;
    int k, rc;
    ws = take(self, 1);
    if (!ws) {
        release(v, 5);
        return NULL;
    }
    rc = run_forward(self, ws, 1, v[0].buf, v[1].buf, v[2].buf, head, &value, v[3].buf, v[4].buf);
    give_back(self, ws);
    release(v, 5);
    if (rc == COGBERT_ERR_NONFINITE)
        Py_RETURN_NONE;
    if (rc != COGBERT_OK)
        return raise_status(rc, NULL);
    if (det) {
        rc = cogbert_argmax(head, in->action_size, &action);
        for (k = 0; k < (int)in->action_size; k++)
            if (head[k] - head[k] != 0.0f) /* NaN or Inf */
                Py_RETURN_NONE;
    } else {
        PyObject *r;
        for (k = 0; k < (int)in->action_size; k++)
            if (head[k] - head[k] != 0.0f) /* NaN or Inf */
                Py_RETURN_NONE;
        r = PyObject_CallMethodNoArgs(rng, random_name);
        if (!r)
            return NULL;
        u = PyFloat_AsDouble(r);
        Py_DECREF(r);
        if (u == -1.0 && PyErr_Occurred())
            return NULL;
        rc = cogbert_sample(head, in->action_size, u, &action, &logp);
    }
    if (rc != COGBERT_OK)
        return raise_status(rc, NULL);
    return Py_BuildValue("(idd)", (int)action, logp, (double)value);
}


/* decide(obs, h, c, h_out, c_out, deterministic, rng) -> (action, log_prob, value) or None.
 * One discrete decision: the step, then argmax or the SDK's inverse-CDF sampling with
 * u = rng.random(), drawn only once the step succeeded, so the caller's generator advances
 * exactly as on the Python path. None (nothing drawn, outputs unspecified) means "take the
 * Python path": anything but 1-D contiguous float32 arrays of the model's sizes, a non-finite
 * observation (the caller's error/sanitize rules apply) or a non-finite head. */
static PyObject *NativePolicy_decide(NativePolicy *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer v[5];
    const cogbert_info *in = &self->info;
    int k, det;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "decide takes 7 arguments");
        return NULL;
    }
    if (!self->p)
        return raise_status(COGBERT_ERR_ARGUMENT, "policy not open");
    if (in->action_kind != COGBERT_ACTION_DISCRETE || in->action_size > 64)
        return raise_status(COGBERT_ERR_UNSUPPORTED, "decide handles discrete models with up to 64 actions");
    det = PyObject_IsTrue(args[5]);
    if (det < 0)
        return NULL;
    for (k = 0; k < 5; k++) {
        if (!get_vec(args[k], &v[k], k >= 3, k == 0 ? in->obs_dim : in->hidden)) {
            release(v, k);
            Py_RETURN_NONE;
        }
    }
    return decide_core(self, v, det, args[6]);
}


/* A frozen dataclass instance made as its generated __init__ makes it: object.__new__, then
 * object.__setattr__ for each field (bind() checked the fields and that there is no
 * __post_init__). Steals the references in values. */
static PyObject *make(PyObject *type, PyObject *const *names, PyObject **values, int n) {
    PyObject *obj = ((PyTypeObject *)type)->tp_new((PyTypeObject *)type, empty_tuple, NULL);
    int k, ok = obj != NULL;
    for (k = 0; k < n; k++) {
        ok = ok && values[k] && PyObject_GenericSetAttr(obj, names[k], values[k]) == 0;
        Py_XDECREF(values[k]);
    }
    if (!ok) {
        Py_XDECREF(obj);
        return NULL;
    }
    return obj;
}

/* act(obs, state, deterministic, rng) -> Decision, or None for the general path: decide() with
 * the arrays taken from the State and the Decision built here, which saves a Python frame and
 * two dataclass __init__ calls per decision. */
static PyObject *NativePolicy_act(NativePolicy *self, PyObject *const *args, Py_ssize_t nargs) {
    const cogbert_info *in = &self->info;
    PyObject *out[2] = {NULL, NULL}, *res, *fields[4], *state2;
    Py_buffer v[5];
    int k, det, got = 0;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "act takes 4 arguments");
        return NULL;
    }
    if (!self->p || !self->state_type || Py_TYPE(args[1]) != (PyTypeObject *)self->state_type ||
        in->action_kind != COGBERT_ACTION_DISCRETE || in->action_size > 64)
        Py_RETURN_NONE;
    det = PyObject_IsTrue(args[2]);
    if (det < 0)
        return NULL;
    {
        PyObject *h = PyObject_GetAttr(args[1], h_name), *c = h ? PyObject_GetAttr(args[1], c_name) : NULL;
        if (!h || !c) {
            Py_XDECREF(h);
            return NULL;
        }
        got = get_vec(args[0], &v[0], 0, in->obs_dim);
        got = got && (get_vec(h, &v[1], 0, in->hidden) || (PyBuffer_Release(&v[0]), 0));
        got = got && (get_vec(c, &v[2], 0, in->hidden) || (release(v, 2), 0));
        Py_DECREF(h); /* the State keeps them alive */
        Py_DECREF(c);
        if (!got)
            Py_RETURN_NONE;
    }
    for (k = 0; k < 2; k++) {
        out[k] = PyObject_Call(self->empty, self->empty_args, NULL);
        if (!out[k] || !get_vec(out[k], &v[3 + k], 1, in->hidden)) {
            if (out[k] && !PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "numpy.empty did not give a float32 vector");
            release(v, 3 + k);
            Py_XDECREF(out[0]);
            Py_XDECREF(out[1]);
            return NULL;
        }
    }
    res = decide_core(self, v, det, args[3]);
    if (!res || res == Py_None) {
        Py_XDECREF(out[0]);
        Py_XDECREF(out[1]);
        return res;
    }
    {
        PyObject *const sn[2] = {h_name, c_name};
        PyObject *const dn[4] = {action_name, log_prob_name, value_name, state_name};
        state2 = make(self->state_type, sn, out, 2);
        fields[0] = PyTuple_GET_ITEM(res, 0);
        fields[1] = PyTuple_GET_ITEM(res, 1);
        fields[2] = PyTuple_GET_ITEM(res, 2);
        Py_INCREF(fields[0]);
        Py_INCREF(fields[1]);
        Py_INCREF(fields[2]);
        fields[3] = state2;
        Py_DECREF(res);
        return make(self->decision_type, dn, fields, 4);
    }
}

static PyObject *NativePolicy_bind(NativePolicy *self, PyObject *args) {
    PyObject *st, *dt, *empty, *dtype, *i64 = NULL, *f64 = NULL;
    if (!PyArg_ParseTuple(args, "O!O!OO|OO", &PyType_Type, &st, &PyType_Type, &dt, &empty, &dtype, &i64, &f64))
        return NULL;
    Py_INCREF(dtype);
    Py_XSETREF(self->f32, dtype);
    Py_XINCREF(i64);
    Py_XSETREF(self->i64, i64);
    Py_XINCREF(f64);
    Py_XSETREF(self->f64, f64);
    Py_XDECREF(self->empty_args);
    self->empty_args = Py_BuildValue("((n)O)", (Py_ssize_t)self->info.hidden, dtype);
    if (!self->empty_args)
        return NULL;
    Py_INCREF(st);
    Py_INCREF(dt);
    Py_INCREF(empty);
    Py_XSETREF(self->state_type, st);
    Py_XSETREF(self->decision_type, dt);
    Py_XSETREF(self->empty, empty);
    Py_RETURN_NONE;
}

/* numpy.empty(shape, dtype) through the bound function: a 1-D (cols 0) or 2-D array. */
static PyObject *new_array(NativePolicy *self, size_t rows, size_t cols, PyObject *dtype) {
    PyObject *shape = cols ? Py_BuildValue("(nn)", (Py_ssize_t)rows, (Py_ssize_t)cols)
                           : Py_BuildValue("(n)", (Py_ssize_t)rows), *res;
    if (!shape)
        return NULL;
    res = PyObject_CallFunctionObjArgs(self->empty, shape, dtype, NULL);
    Py_DECREF(shape);
    return res;
}

/* A C-contiguous buffer of exactly `bytes` bytes with item size `item`, or 0 (error cleared). */
static int get_exact(PyObject *obj, Py_buffer *view, int writable, size_t bytes, Py_ssize_t item) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Clear();
        return 0;
    }
    if ((size_t)view->len == bytes && view->itemsize == item)
        return 1;
    PyBuffer_Release(view);
    return 0;
}

/* act_batch(obs, h, c, deterministic, rng) -> (action int64 [B], log_prob float64 [B],
 * value float32 [B], h [B, H], c [B, H]), or None for the general path. One call: the batch
 * step, then per row argmax or cogbert_sample with u = rng.random(B)[row] (one draw per row,
 * as the general path draws rng.random((B, 1))), so row i equals act() on that row alone with
 * the same u. None (nothing drawn) for anything but C-contiguous float32 arrays of the model's
 * sizes, a non-finite observation or a non-finite logit. */
static PyObject *NativePolicy_act_batch(NativePolicy *self, PyObject *const *args, Py_ssize_t nargs) {
    const cogbert_info *in = &self->info;
    const size_t A = in->action_size, H = in->hidden;
    Py_buffer v[3], o[5];
    PyObject *out[5] = {NULL, NULL, NULL, NULL, NULL}, *u = NULL, *res = NULL;
    size_t batch, b, k;
    cogbert_state *ws;
    int det, rc, n_out = 0, ok;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "act_batch takes 5 arguments");
        return NULL;
    }
    if (!self->p || !self->i64 || !self->f64 || in->action_kind != COGBERT_ACTION_DISCRETE)
        Py_RETURN_NONE;
    det = PyObject_IsTrue(args[3]);
    if (det < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &v[0], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    batch = v[0].ndim == 2 && v[0].shape && (size_t)v[0].shape[1] == in->obs_dim ? (size_t)v[0].shape[0] : 0;
    ok = batch > 0 && v[0].itemsize == 4 && v[0].format &&
         (strcmp(v[0].format, "f") == 0 || strcmp(v[0].format, "<f") == 0 || strcmp(v[0].format, "=f") == 0);
    if (!ok) {
        PyBuffer_Release(&v[0]);
        Py_RETURN_NONE;
    }
    /* h and c: float32 (checked by format), [B, H] (by size). */
    for (k = 1; k < 3; k++) {
        if (!get_exact(args[k], &v[k], 0, batch * H * 4, 4)) {
            release(v, (int)k);
            Py_RETURN_NONE;
        }
        if (!v[k].format || strchr(v[k].format, 'f') == NULL || v[k].ndim != 2 || (size_t)v[k].shape[0] != batch) {
            release(v, (int)k + 1);
            Py_RETURN_NONE;
        }
    }
    if (batch > self->heads_rows) {
        float *grown = (float *)PyMem_Realloc(self->heads, batch * A * sizeof(float));
        if (!grown) {
            release(v, 3);
            return PyErr_NoMemory();
        }
        self->heads = grown;
        self->heads_rows = batch;
    }
    out[0] = new_array(self, batch, 0, self->i64);
    out[1] = new_array(self, batch, 0, self->f64);
    out[2] = new_array(self, batch, 0, self->f32);
    out[3] = new_array(self, batch, H, self->f32);
    out[4] = new_array(self, batch, H, self->f32);
    for (k = 0; k < 5; k++) {
        static const size_t item[5] = {8, 8, 4, 4, 4};
        const size_t bytes = item[k] * batch * (k >= 3 ? H : 1);
        if (!out[k] || !get_exact(out[k], &o[k], 1, bytes, (Py_ssize_t)item[k])) {
            if (out[k] && !PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "numpy.empty did not give the expected array");
            goto fail;
        }
        n_out++;
    }
    ws = take(self, batch);
    if (!ws)
        goto fail;
    if (batch * in->macs_per_step >= GIL_RELEASE_MIN_MACS) {
        Py_BEGIN_ALLOW_THREADS
        rc = run_forward(self, ws, batch, v[0].buf, v[1].buf, v[2].buf, self->heads, o[2].buf, o[3].buf, o[4].buf);
        Py_END_ALLOW_THREADS
    } else {
        rc = run_forward(self, ws, batch, v[0].buf, v[1].buf, v[2].buf, self->heads, o[2].buf, o[3].buf, o[4].buf);
    }
    give_back(self, ws);
    if (rc == COGBERT_ERR_NONFINITE || !cb_finite(self->heads, batch * A)) {
        res = Py_None;
        Py_INCREF(res);
        goto done;
    }
    if (rc != COGBERT_OK) {
        raise_status(rc, NULL);
        goto fail;
    }
    {
        int64_t *action = (int64_t *)o[0].buf;
        double *logp = (double *)o[1].buf;
        Py_buffer ub;
        if (det) {
            for (b = 0; b < batch; b++) {
                int32_t a = 0;
                cogbert_argmax(self->heads + b * A, A, &a);
                action[b] = a;
                logp[b] = 0.0;
            }
        } else {
            PyObject *n = PyLong_FromSize_t(batch);
            u = n ? PyObject_CallMethodOneArg(args[4], random_name, n) : NULL;
            Py_XDECREF(n);
            if (!u)
                goto fail;
            if (!get_exact(u, &ub, 0, batch * 8, 8)) {
                PyErr_SetString(PyExc_TypeError, "rng.random(n) did not return n float64 values");
                goto fail;
            }
            if (!ub.format || strchr(ub.format, 'd') == NULL) {
                PyBuffer_Release(&ub);
                PyErr_SetString(PyExc_TypeError, "rng.random(n) did not return n float64 values");
                goto fail;
            }
            for (b = 0; b < batch; b++) {
                int32_t a = 0;
                cogbert_sample(self->heads + b * A, A, ((const double *)ub.buf)[b], &a, &logp[b]);
                action[b] = a;
            }
            PyBuffer_Release(&ub);
        }
    }
    res = PyTuple_Pack(5, out[0], out[1], out[2], out[3], out[4]);
    goto done;
fail:
    res = NULL;
done:
    release(v, 3);
    release(o, n_out);
    for (k = 0; k < 5; k++)
        Py_XDECREF(out[k]);
    Py_XDECREF(u);
    return res;
}

static PyObject *NativePolicy_set_null_step(NativePolicy *self, PyObject *arg) {
    const int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    self->null_step = on;
    Py_RETURN_NONE;
}

static PyObject *NativePolicy_sample(PyObject *unused, PyObject *args) {
    Py_buffer v;
    PyObject *obj;
    double u, logp = 0.0;
    int32_t a = 0;
    int rc;
    (void)unused;
    if (!PyArg_ParseTuple(args, "Od", &obj, &u))
        return NULL;
    if (get_f32(obj, &v, 0, "logits") < 0)
        return NULL;
    rc = cogbert_sample(v.buf, (size_t)v.len / 4, u, &a, &logp);
    PyBuffer_Release(&v);
    if (rc != COGBERT_OK)
        return raise_status(rc, NULL);
    return Py_BuildValue("(id)", (int)a, logp);
}

static PyMethodDef NativePolicy_methods[] = {
    {"info", (PyCFunction)NativePolicy_info, METH_NOARGS, "the model's dimensions, kernel and memory"},
    {"forward", (PyCFunction)(void (*)(void))NativePolicy_forward, METH_FASTCALL, "step a batch into caller arrays"},
    {"decide", (PyCFunction)(void (*)(void))NativePolicy_decide, METH_FASTCALL, "one discrete decision"},
    {"act", (PyCFunction)(void (*)(void))NativePolicy_act, METH_FASTCALL, "one discrete decision as a Decision"},
    {"act_batch", (PyCFunction)(void (*)(void))NativePolicy_act_batch, METH_FASTCALL, "discrete decisions for a batch"},
    {"bind", (PyCFunction)NativePolicy_bind, METH_VARARGS, "bind(State, Decision, numpy.empty, float32[, int64, float64])"},
    {"set_null_step", (PyCFunction)NativePolicy_set_null_step, METH_O,
     "benchmarks only: skip the C step (zero head and value, state carried over)"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject NativePolicyType = {PyVarObject_HEAD_INIT(NULL, 0)};

static PyObject *best_kernel(PyObject *unused, PyObject *noargs) {
    (void)unused;
    (void)noargs;
    return PyLong_FromLong(cogbert_best_kernel());
}

static PyMethodDef module_methods[] = {
    {"best_kernel", best_kernel, METH_NOARGS, "the kernel AUTO selects on this CPU"},
    {"sample", (PyCFunction)NativePolicy_sample, METH_VARARGS, "sample(logits, u) -> (action, log_prob)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_cogbert_native", "Cogbert native runtime binding", -1,
                                       module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cogbert_native(void) {
    PyObject *m;
    NativePolicyType.tp_name = "_cogbert_native.NativePolicy";
    NativePolicyType.tp_basicsize = sizeof(NativePolicy);
    NativePolicyType.tp_flags = Py_TPFLAGS_DEFAULT;
    NativePolicyType.tp_new = PyType_GenericNew;
    NativePolicyType.tp_init = (initproc)NativePolicy_init;
    NativePolicyType.tp_dealloc = (destructor)NativePolicy_dealloc;
    NativePolicyType.tp_methods = NativePolicy_methods;
    NativePolicyType.tp_doc = "An open Cogbert bundle";
    if (PyType_Ready(&NativePolicyType) < 0)
        return NULL;
    m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    random_name = PyUnicode_InternFromString("random");
    h_name = PyUnicode_InternFromString("h");
    c_name = PyUnicode_InternFromString("c");
    action_name = PyUnicode_InternFromString("action");
    log_prob_name = PyUnicode_InternFromString("log_prob");
    value_name = PyUnicode_InternFromString("value");
    state_name = PyUnicode_InternFromString("state");
    empty_tuple = PyTuple_New(0);
    if (!h_name || !c_name || !action_name || !log_prob_name || !value_name || !state_name || !empty_tuple)
        return NULL;
    NativeError = PyErr_NewException("_cogbert_native.NativeError", NULL, NULL);
    Py_INCREF(&NativePolicyType);
    if (!random_name || !NativeError || PyModule_AddObject(m, "NativePolicy", (PyObject *)&NativePolicyType) < 0 ||
        PyModule_AddObject(m, "NativeError", NativeError) < 0)
        return NULL;
    Py_INCREF(NativeError);
    PyModule_AddIntConstant(m, "OK", COGBERT_OK);
    PyModule_AddIntConstant(m, "ERR_ARGUMENT", COGBERT_ERR_ARGUMENT);
    PyModule_AddIntConstant(m, "ERR_NO_MEMORY", COGBERT_ERR_NO_MEMORY);
    PyModule_AddIntConstant(m, "ERR_IO", COGBERT_ERR_IO);
    PyModule_AddIntConstant(m, "ERR_FORMAT", COGBERT_ERR_FORMAT);
    PyModule_AddIntConstant(m, "ERR_VERSION", COGBERT_ERR_VERSION);
    PyModule_AddIntConstant(m, "ERR_BUNDLE", COGBERT_ERR_BUNDLE);
    PyModule_AddIntConstant(m, "ERR_UNSUPPORTED", COGBERT_ERR_UNSUPPORTED);
    PyModule_AddIntConstant(m, "ERR_NONFINITE", COGBERT_ERR_NONFINITE);
    PyModule_AddIntConstant(m, "KERNEL_AUTO", COGBERT_KERNEL_AUTO);
    PyModule_AddIntConstant(m, "KERNEL_SCALAR", COGBERT_KERNEL_SCALAR);
    PyModule_AddIntConstant(m, "KERNEL_AVX2", COGBERT_KERNEL_AVX2);
    PyModule_AddIntConstant(m, "KERNEL_NEON", COGBERT_KERNEL_NEON);
    PyModule_AddIntConstant(m, "KERNEL_VNNI", COGBERT_KERNEL_VNNI);
    PyModule_AddStringConstant(m, "version", cogbert_version_string());
    return m;
}
