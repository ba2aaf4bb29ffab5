/* Fast elementwise ops: gf.add, gf.tanh, Tensor.__mul__ and their kin.
 *
 * A FastOp wraps the Python function of an op. It runs the forward and
 * records the op here when its arguments are CPU tensors of float32 or
 * float64 (or such a tensor and a Python float or int) and no hook needs to
 * see each op. Anything else calls the Python function, which stays the
 * reference. The record is the one Function.apply would leave: the same
 * Function class, edges, metadata, saved values, saved kinds and version
 * entries, so the Python engine, hooks and create_graph handle it as any
 * other record. The C engine recognises it by its `_op` slot and runs the
 * backward formula here when the arrays are small enough for the loops in
 * kernels.c.
 */
#include "gradflow.h"

#include <stddef.h>

enum { KIND_UNARY, KIND_BINARY, KIND_REFLECTED };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int op;
    int kind;
    PyObject *fallback;
    PyObject *name;
    PyObject *dict;          /* attributes set on the op, as on a function */
    PyObject *weakreflist;
} FastOp;

static const char *op_names[OP_COUNT] = {
    "add", "sub", "mul", "div", "neg", "exp", "log", "sqrt", "sin", "cos",
    "tanh", "sigmoid", "relu",
};

static PyObject *op_codes[OP_COUNT];   /* the `_op` slot value of each op */

/* -- argument checks ------------------------------------------------------- */

/* The array of a tensor that the C loops can take, or NULL: a small,
   C-contiguous float32 or float64 CPU array of a tensor that is not a
   stale view. Every other tensor takes the Python path. */
static PyArrayObject *
fast_array(PyObject *tensor)
{
    if (!gf_is_tensor(tensor)) {
        return NULL;
    }
    PyObject *data = gf_get(tensor, GF.t.data);
    if (data == NULL || !PyArray_CheckExact(data)
            || !gf_loop_fits((PyArrayObject *)data) || !gf_view_is_current(tensor)) {
        return NULL;
    }
    return (PyArrayObject *)data;
}

/* 2**53: Python ints up to this size convert to a double exactly, so the
   loops round them to float32 once, as NumPy does. */
#define EXACT_INT_LIMIT 9007199254740992LL

/* The value of a Python float, or of an int (not a bool) that converts to a
   double exactly. Returns 0 for anything else. */
static int
scalar_value(PyObject *value, double *result)
{
    if (PyFloat_CheckExact(value)) {
        *result = PyFloat_AS_DOUBLE(value);
        return 1;
    }
    if (!PyLong_CheckExact(value)) {
        return 0;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || v > EXACT_INT_LIMIT || v < -EXACT_INT_LIMIT) {
        PyErr_Clear();
        return 0;
    }
    *result = (double)v;
    return 1;
}

static int
requires_grad(PyObject *tensor)
{
    return gf_get(tensor, GF.t.requires_grad) == Py_True;
}

/* Whether records may be made here at all: the Python path of
   Function.apply runs hooks that these ops must not skip. */
static int
hooks_allow(int requires, int record)
{
    if (gf_forward_hooked()) {
        return 0;
    }
    if (record) {
        return PyList_GET_SIZE(GF.record_hooks) == 0
            && PyList_GET_SIZE(GF.saved_tensors_hooks) == 0;
    }
    return !requires || PyList_GET_SIZE(GF.unrecorded_hooks) == 0;
}

/* -- forward ---------------------------------------------------------------- */

/* The functions below return a new reference. They return NULL with an
   exception set on error, and NULL without one when the op must take the
   Python path. */

/* `a op b` for two arrays of one layout, or an array and a Python number. */
static PyObject *
binary_value(int op, PyObject *a, PyObject *b)
{
    PyArrayObject *out;
    double scalar;
    if (PyArray_CheckExact(a) && PyArray_CheckExact(b)) {
        out = gf_loop_binary(op, (PyArrayObject *)a, (PyArrayObject *)b);
    }
    else if (PyArray_CheckExact(a)) {
        if (!scalar_value(b, &scalar)) {
            return NULL;
        }
        out = gf_loop_scalar(op, (PyArrayObject *)a, scalar, 0);
    }
    else {
        if (!scalar_value(a, &scalar)) {
            return NULL;
        }
        out = gf_loop_scalar(op, (PyArrayObject *)b, scalar, 1);
    }
    return out == NULL ? NULL : gf_loop_result(out);
}

/* Smallest positive normal float32 and float64. */
#define FLOAT_NORMAL_MIN 1.17549435e-38
#define DOUBLE_NORMAL_MIN 2.2250738585072014e-308
/* Below these magnitudes NumPy's SIMD sin and cos may square the argument
   into an underflow: about the square roots of the two above, with a
   margin, since the exact bound depends on the CPU's code path. */
#define FLOAT_TRIG_MIN 1e-18
#define DOUBLE_TRIG_MIN 1e-150

/* Whether NumPy's ufunc computes `op` on `x` without a floating-point
   exception, and so has no warning to report from here. The arguments must
   be in range and not subnormal for exp, positive for log, non-negative for
   sqrt, not subnormal for tanh, and neither tiny (below TRIG_MIN), huge nor
   infinite for sin and cos. A NaN fails every test. The bounds are a little
   inside the exact ones. */
#define SAFE_SCAN(T, NORMAL_MIN, TRIG_MIN, EXP_LOW, EXP_HIGH)           \
    do {                                                                \
        const T *v = (const T *)PyArray_DATA(x);                        \
        for (npy_intp i = 0; i < n; i++) {                              \
            const T a = v[i];                                           \
            const T magnitude = a < 0 ? -a : a;                         \
            int ok;                                                     \
            switch (op) {                                               \
            case OP_EXP:                                                \
                ok = a >= (T)EXP_LOW && a <= (T)EXP_HIGH                \
                     && (a == 0 || magnitude >= (T)NORMAL_MIN);         \
                break;                                                  \
            case OP_LOG:                                                \
                ok = a > 0;                                             \
                break;                                                  \
            case OP_SQRT:                                               \
                ok = a >= 0;                                            \
                break;                                                  \
            case OP_TANH:                                               \
                ok = a == 0 || magnitude >= (T)NORMAL_MIN;              \
                break;                                                  \
            default: /* sin, cos */                                     \
                ok = a == 0 || (magnitude >= (T)TRIG_MIN                \
                                && magnitude <= (T)1e30);               \
            }                                                           \
            if (!ok) {                                                  \
                return 0;                                               \
            }                                                           \
        }                                                               \
    } while (0)

static int
ufunc_is_safe(int op, PyArrayObject *x)
{
    npy_intp n = PyArray_SIZE(x);
    if (PyArray_TYPE(x) == NPY_FLOAT) {
        SAFE_SCAN(float, FLOAT_NORMAL_MIN, FLOAT_TRIG_MIN, -87.0, 88.0);
    }
    else {
        SAFE_SCAN(double, DOUBLE_NORMAL_MIN, DOUBLE_TRIG_MIN, -708.0, 709.0);
    }
    return 1;
}

static PyObject *
unary_value(int op, PyArrayObject *x)
{
    switch (op) {
    case OP_NEG: {
        PyArrayObject *out = gf_loop_neg(x);
        return out == NULL ? NULL : gf_loop_result(out);
    }
    case OP_SIGMOID:
        /* Python code, so NumPy's warnings come from gradflow's file. */
        return PyObject_CallFunctionObjArgs(GF.stable_sigmoid, GF.numpy, x, NULL);
    case OP_RELU: {
        /* np.maximum raises no floating-point exception, NaN included. */
        PyObject *zero = PyLong_FromLong(0);
        PyObject *args[2] = {(PyObject *)x, zero};
        PyObject *out = PyObject_Vectorcall(GF.ufuncs[OP_RELU], args, 2, NULL);
        Py_DECREF(zero);
        return out;
    }
    default:
        if (!ufunc_is_safe(op, x)) {
            return NULL;
        }
        return PyObject_CallOneArg(GF.ufuncs[op], (PyObject *)x);
    }
}

/* The array a Tensor stores for a forward result. A ufunc returns a NumPy
   scalar for a 0-d result, and make_tensor stores it as a 0-d array. */
static PyObject *
stored_array(PyObject *value)
{
    if (PyArray_CheckExact(value)) {
        Py_INCREF(value);
        return value;
    }
    return PyArray_FromAny(value, NULL, 0, 0, 0, NULL);
}

/* -- records ---------------------------------------------------------------- */

/* (meta,), the output metadata of a record with one output; steals `meta`.
   Consecutive records of one shape and dtype share `meta` (each output's
   is its input's), and so share this tuple too. */
static PyObject *
single_out_meta(PyObject *meta)
{
    static PyObject *last = NULL;
    if (last != NULL && PyTuple_GET_ITEM(last, 0) == meta) {
        Py_DECREF(meta);
        return Py_NewRef(last);
    }
    PyObject *out_meta = PyTuple_New(1);
    if (out_meta == NULL) {
        Py_DECREF(meta);
        return NULL;
    }
    PyTuple_SET_ITEM(out_meta, 0, meta);
    /* It contains only a (shape, dtype) tuple, which cannot form a cycle. */
    PyObject_GC_UnTrack(out_meta);
    Py_XSETREF(last, Py_NewRef(out_meta));
    return out_meta;
}

/* Record `op` over `args` (Tensors or Python numbers) with output array
   `out`, and return the output Tensor. `values` are the arrays or numbers
   forward saw, `returned` is what it returned (`out`, or the NumPy scalar
   that `out` holds), and `raw` is what its save_for_backward received. */
static PyObject *
record(int op, PyObject *const *args, PyObject *const *values, Py_ssize_t nargs,
       const char *needs, PyObject *out, PyObject *returned, PyObject *const *raw,
       Py_ssize_t nraw)
{
    /* gf_needs[2] contains (True, True), (True, False), (False, True). */
    int needs_index = 0;
    if (nargs == 2 && !needs[1]) {
        needs_index = 1;
    }
    else if (nargs == 2 && !needs[0]) {
        needs_index = 2;
    }
    PyObject *ctx = gf_new_context(GF.functions[op], gf_needs[nargs][needs_index]);
    if (ctx == NULL) {
        return NULL;
    }
    PyObject *out_meta = NULL;
    PyObject *result = NULL;
    if (gf_set_inputs(ctx, args, needs, nargs, 1) < 0) {
        goto error;
    }
    PyObject *metas = gf_get(ctx, GF.c.input_meta);
    /* An elementwise output usually has its input's shape and dtype. */
    PyObject *meta = NULL;
    for (Py_ssize_t k = 0; k < nargs && meta == NULL; k++) {
        PyObject *input_meta = PyTuple_GET_ITEM(metas, k);
        if (input_meta != Py_None && gf_meta_matches(input_meta, (PyArrayObject *)out)) {
            meta = input_meta;
            Py_INCREF(meta);
        }
    }
    if (meta == NULL && (meta = gf_meta_of((PyArrayObject *)out)) == NULL) {
        goto error;
    }
    if ((out_meta = single_out_meta(meta)) == NULL) {
        goto error;
    }
    gf_set_steal(ctx, GF.c.out_meta, out_meta);
    out_meta = NULL;
    gf_set(ctx, GF.c.array_module, GF.numpy);
    gf_set(ctx, GF.c.op, op_codes[op]);

    result = gf_new_tensor(out, ctx, 0);
    if (result == NULL) {
        goto error;
    }
    if (nraw > 0 && gf_set_saved(ctx, args, values, nargs, raw, nraw, &returned,
                                 &result, 1) < 0) {
        goto error;
    }
    if (gf_untrack_record(ctx) < 0) {
        goto error;
    }
    Py_DECREF(ctx);
    return result;

error:
    Py_XDECREF(out_meta);
    Py_XDECREF(result);
    Py_DECREF(ctx);
    return NULL;
}

/* What each op's forward passes to save_for_backward. */
static Py_ssize_t
saved_by(int op, PyObject *const *values, const char *needs, PyObject *out,
         PyObject **raw)
{
    switch (op) {
    case OP_MUL:
        /* Each gradient needs only the other operand. */
        raw[0] = needs[1] ? values[0] : Py_None;
        raw[1] = needs[0] ? values[1] : Py_None;
        return 2;
    case OP_DIV:
        raw[0] = values[1];
        raw[1] = out;
        return 2;
    case OP_EXP: case OP_SQRT: case OP_TANH: case OP_SIGMOID: case OP_RELU:
        raw[0] = out;
        return 1;
    case OP_LOG: case OP_SIN: case OP_COS:
        raw[0] = values[0];
        return 1;
    default:
        return 0;
    }
}

/* Run `op` on its checked arguments, recording it when a gradient is
   needed. `values` are the arrays of Tensor arguments and the numbers
   themselves. Returns 1 with *result set (NULL with an exception on
   error), or 0 when the op must take the Python path. */
static int
run_op(int op, PyObject *const *args, PyObject *const *values, Py_ssize_t nargs,
       const char *needs, int record_it, PyObject **result)
{
    PyObject *value;
    if (nargs == 1) {
        value = unary_value(op, (PyArrayObject *)values[0]);
    }
    else {
        value = binary_value(op, values[0], values[1]);
    }
    if (value == NULL) {
        if (!PyErr_Occurred()) {
            return 0;
        }
        *result = NULL;
        return 1;
    }
    PyObject *out = stored_array(value);
    if (out == NULL) {
        Py_DECREF(value);
        *result = NULL;
        return 1;
    }
    if (!record_it) {
        *result = gf_new_tensor(out, NULL, 0);
    }
    else {
        PyObject *raw[2];
        Py_ssize_t nraw = saved_by(op, values, needs, value, raw);
        *result = record(op, args, values, nargs, needs, out, value, raw, nraw);
    }
    Py_DECREF(out);
    Py_DECREF(value);
    return 1;
}

/* 1: handled (*result set, or NULL with an exception); 0: not handled. */
static int
try_unary(FastOp *self, PyObject *x, PyObject **result)
{
    PyArrayObject *array = fast_array(x);
    if (array == NULL) {
        return 0;
    }
    char needs[1] = {requires_grad(x)};
    int record_it = needs[0] && gf_grad_enabled();
    if (!hooks_allow(needs[0], record_it)) {
        return 0;
    }
    /* Held, because sigmoid's forward runs Python code, which could rebind
       the tensor's array. */
    Py_INCREF(array);
    PyObject *values[1] = {(PyObject *)array};
    int handled = run_op(self->op, &x, values, 1, needs, record_it, result);
    Py_DECREF(array);
    return handled;
}

static int
try_binary(FastOp *self, PyObject *a, PyObject *b, PyObject **result)
{
    PyObject *args[2] = {a, b};
    PyObject *values[2];
    char needs[2] = {0, 0};
    PyArrayObject *arrays[2] = {NULL, NULL};
    for (int k = 0; k < 2; k++) {
        if (PyFloat_CheckExact(args[k]) || PyLong_CheckExact(args[k])) {
            values[k] = args[k];
            continue;
        }
        arrays[k] = fast_array(args[k]);
        if (arrays[k] == NULL) {
            return 0;
        }
        values[k] = (PyObject *)arrays[k];
        needs[k] = requires_grad(args[k]);
    }
    if (arrays[0] == NULL && arrays[1] == NULL) {
        return 0;
    }
    /* Broadcasting and mixed dtypes take the Python path. */
    if (arrays[0] != NULL && arrays[1] != NULL
            && !gf_loop_same_layout(arrays[0], arrays[1])) {
        return 0;
    }
    int requires = needs[0] || needs[1];
    int record_it = requires && gf_grad_enabled();
    if (!hooks_allow(requires, record_it)) {
        return 0;
    }
    return run_op(self->op, args, values, 2, needs, record_it, result);
}

/* -- backward --------------------------------------------------------------- */

/* The saved values of a record as backward reads them (arrays for inputs),
   or -1 when they cannot be read here: freed, changed in place, or packed. */
static int
read_saved(PyObject *node, PyObject **values, Py_ssize_t count)
{
    if (gf_get(node, GF.c.released) != Py_False) {
        return -1;
    }
    PyObject *saved = gf_get(node, GF.c.saved);
    PyObject *kinds = gf_get(node, GF.c.saved_kinds);
    PyObject *versions = gf_get(node, GF.c.saved_versions);
    if (saved == NULL || !PyTuple_CheckExact(saved) || PyTuple_GET_SIZE(saved) != count
            || kinds == NULL || !PyTuple_CheckExact(kinds)
            || PyTuple_GET_SIZE(kinds) != count) {
        return -1;
    }
    if (versions != NULL && (PyList_CheckExact(versions) || PyTuple_CheckExact(versions))) {
        /* Only list counters holding the very object recorded are known
           current here; Python compares any other kind. */
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(versions); i++) {
            PyObject *entry = PySequence_Fast_GET_ITEM(versions, i);
            if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) {
                return -1;
            }
            PyObject *counter = PyTuple_GET_ITEM(entry, 1);
            if (!PyList_CheckExact(counter) || PyList_GET_SIZE(counter) < 1
                    || PyList_GET_ITEM(counter, 0) != PyTuple_GET_ITEM(entry, 2)) {
                return -1;
            }
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyTuple_GET_ITEM(saved, i);
        if (PyTuple_GET_ITEM(kinds, i) == gf_str_input) {
            value = gf_get(value, GF.t.data);
        }
        values[i] = value;
    }
    return 0;
}

/* An array that a loop can read beside `grad`. */
static PyArrayObject *
loop_operand(PyObject *value, PyArrayObject *grad)
{
    if (value == NULL || !PyArray_CheckExact(value)) {
        return NULL;
    }
    PyArrayObject *array = (PyArrayObject *)value;
    if (!gf_loop_fits(array) || !gf_loop_same_layout(array, grad)) {
        return NULL;
    }
    return array;
}

/* grad * value, or grad / value, for a saved array or Python number. NULL,
   with no exception set, when a loop cannot compute it. */
static PyArrayObject *
grad_times(int op, PyArrayObject *grad, PyObject *value)
{
    double scalar;
    if (scalar_value(value, &scalar)) {
        return gf_loop_scalar(op, grad, scalar, 0);
    }
    PyArrayObject *array = loop_operand(value, grad);
    if (array == NULL) {
        return NULL;
    }
    return gf_loop_binary(op, grad, array);
}

static int
needs_at(PyObject *node, Py_ssize_t i)
{
    PyObject *needs = gf_get(node, GF.c.needs_input_grad);
    if (needs == NULL || !PyTuple_CheckExact(needs) || PyTuple_GET_SIZE(needs) <= i) {
        return 1;
    }
    return PyTuple_GET_ITEM(needs, i) == Py_True;
}

/* Compute the input gradients of a fast-op record into a and b (new
   references, NULL for None). Returns 0 when a loop cannot, after
   dropping what it made. */
static int
op_gradients(PyObject *node, int op, PyArrayObject *grad, Py_ssize_t n_inputs,
             PyArrayObject **a, PyArrayObject **b)
{
    PyObject *saved[2] = {NULL, NULL};
    switch (op) {
    case OP_SUB:
        /* The gradient of a passes through; gf_op_backward adds it. */
        return n_inputs == 2 && (!needs_at(node, 1) || (*b = gf_loop_neg(grad)) != NULL);

    case OP_NEG:
        return n_inputs == 1 && (*a = gf_loop_neg(grad)) != NULL;

    case OP_MUL:
        /* Each gradient is the output gradient times the other operand. */
        if (n_inputs != 2 || read_saved(node, saved, 2) < 0) {
            return 0;
        }
        if (needs_at(node, 0) && (*a = grad_times(OP_MUL, grad, saved[1])) == NULL) {
            return 0;
        }
        if (needs_at(node, 1) && (*b = grad_times(OP_MUL, grad, saved[0])) == NULL) {
            Py_CLEAR(*a);
            return 0;
        }
        return 1;

    case OP_DIV: {
        /* grad_a = grad / b and grad_b = -grad_a * out; grad_a is computed
           (and returned) even when only b needs it, as in Python. */
        if (n_inputs != 2 || read_saved(node, saved, 2) < 0) {
            return 0;
        }
        if ((*a = grad_times(OP_DIV, grad, saved[0])) == NULL) {
            return 0;
        }
        if (!needs_at(node, 1)) {
            return 1;
        }
        PyArrayObject *out = loop_operand(saved[1], grad);
        PyArrayObject *negated = out != NULL ? gf_loop_neg(*a) : NULL;
        if (negated != NULL) {
            *b = gf_loop_binary(OP_MUL, negated, out);
            Py_DECREF(negated);
        }
        if (*b == NULL) {
            Py_CLEAR(*a);
            return 0;
        }
        return 1;
    }

    case OP_EXP: case OP_LOG: case OP_SQRT: case OP_TANH: case OP_SIGMOID:
    case OP_RELU: {
        if (n_inputs != 1 || read_saved(node, saved, 1) < 0) {
            return 0;
        }
        PyArrayObject *s = loop_operand(saved[0], grad);
        return s != NULL && (*a = gf_loop_activation_grad(op, s, grad)) != NULL;
    }

    default:
        return 0;
    }
}

/* Run the backward of a fast-op record on arrays. Returns 1 with
   grad_inputs filled (new references, NULL for None), 0 when the Python
   backward must run instead. A record counts as a fast-op record only when
   its Function is that op's, so a custom Function's own `_op` attribute
   is never taken for one. */
int
gf_op_backward(PyObject *node, PyObject *op_code, PyObject *grad_object,
               PyObject **grad_inputs, Py_ssize_t n_inputs)
{
    long op = PyLong_AsLong(op_code);
    if (op < 0 || op >= OP_COUNT) {
        PyErr_Clear();
        return 0;
    }
    if (gf_get(node, GF.c.function) != GF.functions[op]) {
        return 0;
    }
    /* The Python backward leaves xp on the record; so does this. */
    gf_set(node, GF.c.xp, GF.numpy_namespace);
    if (op == OP_ADD && n_inputs == 2) {
        Py_INCREF(grad_object);
        Py_INCREF(grad_object);
        grad_inputs[0] = grad_inputs[1] = grad_object;
        return 1;
    }
    if (!PyArray_CheckExact(grad_object) || !gf_loop_fits((PyArrayObject *)grad_object)) {
        return 0;
    }
    PyArrayObject *a = NULL, *b = NULL;
    if (!op_gradients(node, (int)op, (PyArrayObject *)grad_object, n_inputs, &a, &b)) {
        return 0;
    }
    grad_inputs[0] = a == NULL ? NULL : gf_loop_result(a);
    grad_inputs[1] = b == NULL ? NULL : gf_loop_result(b);
    if (op == OP_SUB) {
        /* The output gradient itself, as Sub.backward returns it. */
        Py_INCREF(grad_object);
        grad_inputs[0] = grad_object;
    }
    return 1;
}

/* -- the FastOp type -------------------------------------------------------- */

static PyObject *
fastop_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                  PyObject *kwnames)
{
    FastOp *self = (FastOp *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (GF.bound && GF.fast_ops && kwnames == NULL) {
        PyObject *result = NULL;
        int handled = 0;
        if (self->kind == KIND_UNARY && nargs == 1) {
            handled = try_unary(self, args[0], &result);
        }
        else if (self->kind == KIND_BINARY && nargs == 2) {
            handled = try_binary(self, args[0], args[1], &result);
        }
        else if (self->kind == KIND_REFLECTED && nargs == 2) {
            handled = try_binary(self, args[1], args[0], &result);
        }
        if (handled) {
            return result;
        }
    }
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *
fastop_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"name", "fallback", "reflected", NULL};
    const char *name;
    PyObject *fallback;
    int reflected = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sO|p:FastOp", keywords,
                                     &name, &fallback, &reflected)) {
        return NULL;
    }
    int op = -1;
    for (int i = 0; i < OP_COUNT; i++) {
        if (strcmp(name, op_names[i]) == 0) {
            op = i;
        }
    }
    if (op < 0) {
        PyErr_Format(PyExc_ValueError, "FastOp: no fast path for op '%s'", name);
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "FastOp: fallback must be callable");
        return NULL;
    }
    FastOp *self = (FastOp *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = fastop_vectorcall;
    self->op = op;
    if (op > OP_DIV) {
        self->kind = KIND_UNARY;
    }
    else {
        self->kind = reflected ? KIND_REFLECTED : KIND_BINARY;
    }
    Py_INCREF(fallback);
    self->fallback = fallback;
    self->name = PyUnicode_FromString(name);
    if (self->name == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
fastop_traverse(FastOp *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    Py_VISIT(self->dict);
    return 0;
}

static int
fastop_clear(FastOp *self)
{
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->dict);
    return 0;
}

static void
fastop_dealloc(FastOp *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    fastop_clear(self);
    Py_CLEAR(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Bound to a Tensor as a method, the op receives the tensor first. */
static PyObject *
fastop_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

/* Attributes that a FastOp does not define itself are read from the
   wrapped function. */
static PyObject *
fastop_getattro(PyObject *self, PyObject *name)
{
    PyObject *value = PyObject_GenericGetAttr(self, name);
    if (value != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) {
        return value;
    }
    PyErr_Clear();
    return PyObject_GetAttr(((FastOp *)self)->fallback, name);
}

static PyObject *
fastop_repr(FastOp *self)
{
    return PyObject_Repr(self->fallback);
}

static PyObject *
fastop_get_doc(FastOp *self, void *closure)
{
    return PyObject_GetAttrString(self->fallback, "__doc__");
}

static PyObject *
fastop_get_wrapped(FastOp *self, void *closure)
{
    Py_INCREF(self->fallback);
    return self->fallback;
}

static PyObject *
fastop_get_fallback_attribute(FastOp *self, void *name)
{
    return PyObject_GetAttrString(self->fallback, (const char *)name);
}

/* Copies and pickles refer to the op itself, as they do to a function. */
static PyObject *
fastop_copy(PyObject *self, PyObject *unused)
{
    Py_INCREF(self);
    return self;
}

static PyObject *
fastop_reduce(FastOp *self, PyObject *unused)
{
    return PyObject_GetAttrString(self->fallback, "__qualname__");
}

static PyMethodDef fastop_methods[] = {
    {"__copy__", fastop_copy, METH_NOARGS, NULL},
    {"__deepcopy__", fastop_copy, METH_O, NULL},
    {"__reduce__", (PyCFunction)fastop_reduce, METH_NOARGS, NULL},
    {NULL},
};

static PyGetSetDef fastop_getset[] = {
    {"__doc__", (getter)fastop_get_doc, NULL, NULL, NULL},
    {"__module__", (getter)fastop_get_fallback_attribute, NULL, NULL, "__module__"},
    {"__name__", (getter)fastop_get_fallback_attribute, NULL, NULL, "__name__"},
    {"__qualname__", (getter)fastop_get_fallback_attribute, NULL, NULL, "__qualname__"},
    {"__wrapped__", (getter)fastop_get_wrapped, NULL,
     "The Python function that runs whenever the fast path does not apply.", NULL},
    {NULL},
};

PyTypeObject GF_FastOpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gradflow._C.FastOp",
    .tp_doc = "FastOp(name, fallback, reflected=False)\n--\n\n"
              "An elementwise op with a C path for CPU float tensors; every other "
              "call goes to `fallback`.",
    .tp_basicsize = sizeof(FastOp),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC
                | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = fastop_new,
    .tp_dealloc = (destructor)fastop_dealloc,
    .tp_traverse = (traverseproc)fastop_traverse,
    .tp_clear = (inquiry)fastop_clear,
    .tp_vectorcall_offset = offsetof(FastOp, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = fastop_descr_get,
    .tp_getattro = fastop_getattro,
    .tp_repr = (reprfunc)fastop_repr,
    .tp_getset = fastop_getset,
    .tp_methods = fastop_methods,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_dictoffset = offsetof(FastOp, dict),
    .tp_weaklistoffset = offsetof(FastOp, weakreflist),
};

/* Take each op's Function class and NumPy ufunc from the dicts that
   gradflow.bind() passes, keyed by op name. */
int
gf_ops_bind(PyObject *functions, PyObject *ufuncs)
{
    for (int i = 0; i < OP_COUNT; i++) {
        PyObject *function = PyDict_GetItemString(functions, op_names[i]);
        if (function == NULL) {
            PyErr_Format(PyExc_KeyError, "bind: no Function for op '%s'", op_names[i]);
            return -1;
        }
        Py_INCREF(function);
        Py_XSETREF(GF.functions[i], function);
        PyObject *ufunc = PyDict_GetItemString(ufuncs, op_names[i]);
        Py_XINCREF(ufunc);
        Py_XSETREF(GF.ufuncs[i], ufunc);
        if (op_codes[i] == NULL) {
            op_codes[i] = PyLong_FromLong(i);
            if (op_codes[i] == NULL) {
                return -1;
            }
        }
    }
    return 0;
}
