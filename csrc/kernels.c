/* Elementwise loops on small, contiguous float32 and float64 arrays.
 *
 * They replace NumPy calls where the call itself costs more than the work:
 * a ufunc call on a 4-element array takes 300-600 ns, the loop a few. Each
 * loop evaluates the same IEEE operations, in the same order and at the
 * same precision, as the NumPy expression it stands for, so the results are
 * bitwise equal; the build passes -ffp-contract=off so that no multiply and
 * add fuse into one rounding.
 *
 * NumPy reports floating-point exceptions (overflow, division by zero,
 * invalid, underflow) as np.errstate sets. A loop that raises any of them
 * discards its result and returns NULL without an error set, and the caller
 * takes the Python path, where NumPy reports the exception from gradflow's
 * own code. A loop whose result contains a NaN does the same, because which
 * input NaN's payload an operation keeps is up to the instruction order,
 * which the compiler may change.
 */
#include <fenv.h>

#include "gradflow.h"

#if defined(__x86_64__) && defined(__SSE2__)
#include <immintrin.h>

/* On x86-64 the loops compute on SSE or AVX registers, which record
   exceptions only in the MXCSR register: invalid (bit 0), division by zero
   (2), overflow (3) and underflow (4). Reading and clearing those bits
   directly costs a few cycles, where feclearexcept also saves and reloads
   the x87 environment, which took about 6 % of a graph of tiny ops. */
#define GF_MXCSR_EXCEPTIONS 0x1Du

static inline void
clear_fp_exceptions(void)
{
    unsigned int csr = _mm_getcsr();
    if (csr & GF_MXCSR_EXCEPTIONS) {
        _mm_setcsr(csr & ~GF_MXCSR_EXCEPTIONS);
    }
}

static inline int
fp_exceptions_raised(void)
{
    return (_mm_getcsr() & GF_MXCSR_EXCEPTIONS) != 0;
}
#else
#define GF_FP_EXCEPTIONS (FE_DIVBYZERO | FE_INVALID | FE_OVERFLOW | FE_UNDERFLOW)

static inline void
clear_fp_exceptions(void)
{
    feclearexcept(GF_FP_EXCEPTIONS);
}

static inline int
fp_exceptions_raised(void)
{
    return fetestexcept(GF_FP_EXCEPTIONS) != 0;
}
#endif

/* NumPy's float32 and float64 dtypes. An array with any other descriptor
   of those types (another byte order, metadata) takes the NumPy path,
   whose result dtype the loops would not reproduce. */
static PyArray_Descr *float_descr, *double_descr;

int
gf_loop_fits(PyArrayObject *a)
{
    if (float_descr == NULL) {
        float_descr = PyArray_DescrFromType(NPY_FLOAT);
        double_descr = PyArray_DescrFromType(NPY_DOUBLE);
    }
    PyArray_Descr *descr = PyArray_DESCR(a);
    return (descr == float_descr || descr == double_descr)
        && PyArray_ISCARRAY_RO(a) && PyArray_SIZE(a) < GF.small_size;
}

PyObject *
gf_loop_result(PyArrayObject *out)
{
    if (PyArray_NDIM(out) == 0) {
        return PyArray_Return(out);
    }
    return (PyObject *)out;
}

int
gf_loop_same_layout(PyArrayObject *a, PyArrayObject *b)
{
    int ndim = PyArray_NDIM(a);
    if (PyArray_TYPE(a) != PyArray_TYPE(b) || ndim != PyArray_NDIM(b)) {
        return 0;
    }
    npy_intp *da = PyArray_DIMS(a), *db = PyArray_DIMS(b);
    for (int i = 0; i < ndim; i++) {
        if (da[i] != db[i]) {
            return 0;
        }
    }
    return 1;
}

static PyArrayObject *
new_like(PyArrayObject *a)
{
    return (PyArrayObject *)PyArray_SimpleNew(
        PyArray_NDIM(a), PyArray_DIMS(a), PyArray_TYPE(a));
}

/* A new array shaped like `like`, with the floating-point exception flags
   cleared for the loop that fills it. */
static PyArrayObject *
start_loop(PyArrayObject *like)
{
    PyArrayObject *out = new_like(like);
    if (out == NULL) {
        PyErr_Clear();
        return NULL;
    }
    clear_fp_exceptions();
    return out;
}

/* Run DISPATCH(float) or DISPATCH(double), by the dtype of `array`. */
#define BY_DTYPE(array, DISPATCH)                                       \
    if (PyArray_TYPE(array) == NPY_FLOAT) {                             \
        DISPATCH(float)                                                 \
    }                                                                   \
    else {                                                              \
        DISPATCH(double)                                                \
    }

/* Return `out`, or drop it and return NULL if the loop raised an exception
   or, unless `nan_allowed`, produced a NaN. */
static PyArrayObject *
checked(PyArrayObject *out, int nan_allowed)
{
    int rejected = fp_exceptions_raised();
    npy_intp n = PyArray_SIZE(out);
    if (!rejected && !nan_allowed && PyArray_TYPE(out) == NPY_FLOAT) {
        const float *r = (const float *)PyArray_DATA(out);
        for (npy_intp i = 0; i < n; i++) {
            rejected |= r[i] != r[i];
        }
    }
    else if (!rejected && !nan_allowed) {
        const double *r = (const double *)PyArray_DATA(out);
        for (npy_intp i = 0; i < n; i++) {
            rejected |= r[i] != r[i];
        }
    }
    if (rejected) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

#define BINARY_LOOP(T, EXPR)                                            \
    do {                                                                \
        const T *x = (const T *)PyArray_DATA(a);                        \
        const T *y = (const T *)PyArray_DATA(b);                        \
        T *r = (T *)PyArray_DATA(out);                                  \
        for (npy_intp i = 0; i < n; i++) {                              \
            r[i] = EXPR;                                                \
        }                                                               \
    } while (0)

#define BINARY_DISPATCH(T)                                              \
    switch (op) {                                                       \
    case OP_ADD: BINARY_LOOP(T, x[i] + y[i]); break;                    \
    case OP_SUB: BINARY_LOOP(T, x[i] - y[i]); break;                    \
    case OP_MUL: BINARY_LOOP(T, x[i] * y[i]); break;                    \
    case OP_DIV: BINARY_LOOP(T, x[i] / y[i]); break;                    \
    }

PyArrayObject *
gf_loop_binary(int op, PyArrayObject *a, PyArrayObject *b)
{
    PyArrayObject *out = start_loop(a);
    if (out == NULL) {
        return NULL;
    }
    npy_intp n = PyArray_SIZE(a);
    BY_DTYPE(a, BINARY_DISPATCH)
    return checked(out, 0);
}

#define SCALAR_LOOP(T, EXPR)                                            \
    do {                                                                \
        const T *x = (const T *)PyArray_DATA(a);                        \
        T *r = (T *)PyArray_DATA(out);                                  \
        const T s = (T)scalar;                                          \
        for (npy_intp i = 0; i < n; i++) {                              \
            r[i] = EXPR;                                                \
        }                                                               \
    } while (0)

#define SCALAR_DISPATCH(T)                                              \
    if (scalar_first) {                                                 \
        switch (op) {                                                   \
        case OP_ADD: SCALAR_LOOP(T, s + x[i]); break;                   \
        case OP_SUB: SCALAR_LOOP(T, s - x[i]); break;                   \
        case OP_MUL: SCALAR_LOOP(T, s * x[i]); break;                   \
        case OP_DIV: SCALAR_LOOP(T, s / x[i]); break;                   \
        }                                                               \
    }                                                                   \
    else {                                                              \
        switch (op) {                                                   \
        case OP_ADD: SCALAR_LOOP(T, x[i] + s); break;                   \
        case OP_SUB: SCALAR_LOOP(T, x[i] - s); break;                   \
        case OP_MUL: SCALAR_LOOP(T, x[i] * s); break;                   \
        case OP_DIV: SCALAR_LOOP(T, x[i] / s); break;                   \
        }                                                               \
    }

/* `a op scalar` (or `scalar op a`) with a Python float, which NumPy converts
   to the array's dtype before the operation. A float too large for float32
   overflows in that conversion, which the exception check catches. */
PyArrayObject *
gf_loop_scalar(int op, PyArrayObject *a, double scalar, int scalar_first)
{
    PyArrayObject *out = start_loop(a);
    if (out == NULL) {
        return NULL;
    }
    npy_intp n = PyArray_SIZE(a);
    BY_DTYPE(a, SCALAR_DISPATCH)
    return checked(out, 0);
}

#define UNARY_LOOP(T, EXPR)                                             \
    do {                                                                \
        const T *x = (const T *)PyArray_DATA(a);                        \
        T *r = (T *)PyArray_DATA(out);                                  \
        for (npy_intp i = 0; i < n; i++) {                              \
            r[i] = EXPR;                                                \
        }                                                               \
    } while (0)

PyArrayObject *
gf_loop_neg(PyArrayObject *a)
{
    PyArrayObject *out = start_loop(a);
    if (out == NULL) {
        return NULL;
    }
    npy_intp n = PyArray_SIZE(a);
#define NEG_DISPATCH(T) UNARY_LOOP(T, -x[i]);
    BY_DTYPE(a, NEG_DISPATCH)
#undef NEG_DISPATCH
    /* Negation only flips the sign bit, of a NaN too, as NumPy's does. */
    return checked(out, 1);
}

/* The generic backward formulas of the ops in gradflow/_ops, with `s` the
   saved array (the op's output, or its input for log) and `g` the output
   gradient:
     tanh     grad * (1 - out * out)
     sigmoid  grad * out * (1 - out)
     relu     where(out <= 0, 0, grad)
     exp      grad * out
     log      grad / x
     sqrt     grad / (2 * out)
   The parentheses are NumPy's evaluation order. */
#define GRAD_LOOP(T, EXPR)                                              \
    do {                                                                \
        const T *sv = (const T *)PyArray_DATA(saved);                   \
        const T *gv = (const T *)PyArray_DATA(grad);                    \
        T *r = (T *)PyArray_DATA(out);                                  \
        for (npy_intp i = 0; i < n; i++) {                              \
            const T s = sv[i], g = gv[i];                               \
            r[i] = EXPR;                                                \
        }                                                               \
    } while (0)

#define GRAD_DISPATCH(T)                                                \
    switch (op) {                                                       \
    case OP_TANH: GRAD_LOOP(T, g * ((T)1 - s * s)); break;              \
    case OP_SIGMOID: GRAD_LOOP(T, (g * s) * ((T)1 - s)); break;         \
    case OP_RELU: GRAD_LOOP(T, s <= (T)0 ? (T)0 : g); break;            \
    case OP_EXP: GRAD_LOOP(T, g * s); break;                            \
    case OP_LOG: GRAD_LOOP(T, g / s); break;                            \
    case OP_SQRT: GRAD_LOOP(T, g / ((T)2 * s)); break;                  \
    default: Py_DECREF(out); return NULL;                               \
    }

PyArrayObject *
gf_loop_activation_grad(int op, PyArrayObject *saved, PyArrayObject *grad)
{
    PyArrayObject *out = start_loop(grad);
    if (out == NULL) {
        return NULL;
    }
    npy_intp n = PyArray_SIZE(grad);
    BY_DTYPE(grad, GRAD_DISPATCH)
    return checked(out, 0);
}
