/* Shared declarations of gradflow's C extension, gradflow._C.
 *
 * The extension does not define its own Tensor or record types. It writes
 * the __slots__ of the Python classes gradflow.Tensor and
 * gradflow.autograd.Context directly, at the offsets their member
 * descriptors report. A tensor or record made here is therefore the same
 * object the Python code makes, and every Python path (hooks,
 * create_graph, checkpointing, the ledger) reads it unchanged.
 */
#ifndef GRADFLOW_H
#define GRADFLOW_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL gradflow_ARRAY_API
#ifndef GRADFLOW_MODULE_C
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

/* The elementwise operations that have a C path. */
typedef enum {
    OP_ADD, OP_SUB, OP_MUL, OP_DIV,
    OP_NEG, OP_EXP, OP_LOG, OP_SQRT, OP_SIN, OP_COS, OP_TANH, OP_SIGMOID,
    OP_RELU,
    OP_COUNT
} gf_op;

/* Slot offsets of gradflow.Tensor. */
typedef struct {
    Py_ssize_t data, grad, grad_fn, out_index, requires_grad, version, hooks,
        view, grad_buffer;
} gf_tensor_slots;

/* Slot offsets of gradflow.autograd.Context. */
typedef struct {
    Py_ssize_t function, edges, input_meta, needs_input_grad, out_meta, saved,
        saved_kinds, saved_versions, released, hooks, retained, xp,
        array_module, op;
} gf_context_slots;

/* What gradflow.bind() hands over; valid once `bound` is set. */
typedef struct {
    int bound;
    int fast_ops;                 /* fast elementwise ops switched on */
    PyTypeObject *tensor_type;
    PyTypeObject *context_type;
    gf_tensor_slots t;
    gf_context_slots c;

    /* The hook lists of gradflow.autograd._function. They are mutated in
       place, never rebound, so holding the list objects is enough. */
    PyObject *record_hooks, *unrecorded_hooks, *forward_hooks, *release_hooks,
        *saved_tensors_hooks;
    PyObject *function_globals;   /* _function's dict, for anomaly_hook */

    PyObject *numpy;
    PyObject *numpy_namespace;    /* array_namespace(numpy) */
    PyObject *array_namespace;    /* the function, for other modules */
    PyObject *functions[OP_COUNT];  /* the Function class of each op */
    PyObject *ufuncs[OP_COUNT];     /* NumPy's ufunc, where one computes it */
    PyObject *stable_sigmoid;

    /* Python helpers of the engine, for the cases the C walk hands back. */
    PyObject *collect_output_grads, *run_output_hooks, *fit_to_input,
        *store_leaf_grads, *raise_gradient_count, *sum_grads;

    /* What the C apply calls: Function.apply in Python (for the cases it
       hands back), make_tensor, _device.array_module, _views.refresh and
       the device check of gradflow._tensor. */
    PyObject *python_apply, *make_tensor, *array_module_of, *refresh_view,
        *check_devices;

    Py_ssize_t small_size;   /* arrays below this size run the C loops */

    /* Whether new records join Python's cyclic garbage collector; see
       records.c. Off until something can make a cycle through a record. */
    int track_records;
    PyObject *inert_types;   /* bookkeeping classes records may keep */

    /* Whether the bound Context derives from GF_RecordBaseType. */
    int records_have_base;
} gf_state;

extern gf_state GF;

/* Interned strings and shared constants, made at module init. */
extern PyObject *gf_str_input;      /* "input", the saved kind of an input */
extern PyObject *gf_str_backward;
extern PyObject *gf_str_forward;
extern PyObject *gf_str_release;
extern PyObject *gf_str_anomaly_hook;
extern PyObject *gf_str_non_diff;   /* "_non_diff", kept in a record's __dict__ */
extern PyObject *gf_str_dot;        /* "." */
extern PyObject *gf_str_gradflow_prefix; /* "gradflow." */
extern PyObject *gf_empty_tuple;
extern PyObject *gf_needs[3][3];    /* (True,), (True, False), ... by count */
/* Saved kinds of a record whose saved values are neither inputs nor
   outputs: (None,) to (None, None, None, None), shared by such records. */
#define GF_SHARED_KINDS 4
extern PyObject *gf_no_kinds[GF_SHARED_KINDS + 1];

/* Grad mode: the per-thread flag behind gf.no_grad() and friends. */
int gf_grad_enabled(void);
void gf_set_grad_enabled(int enabled);

/* Slot access. gf_get returns a borrowed reference, or NULL when unset. */
#define GF_SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

static inline PyObject *
gf_get(PyObject *obj, Py_ssize_t offset)
{
    return GF_SLOT(obj, offset);
}

/* Store a new reference to `value` (may be NULL) and drop the old one. */
static inline void
gf_set(PyObject *obj, Py_ssize_t offset, PyObject *value)
{
    PyObject *old = GF_SLOT(obj, offset);
    Py_XINCREF(value);
    GF_SLOT(obj, offset) = value;
    Py_XDECREF(old);
}

/* Store `value`, taking over the caller's reference. */
static inline void
gf_set_steal(PyObject *obj, Py_ssize_t offset, PyObject *value)
{
    PyObject *old = GF_SLOT(obj, offset);
    GF_SLOT(obj, offset) = value;
    Py_XDECREF(old);
}

static inline int
gf_is_tensor(PyObject *obj)
{
    return PyObject_TypeCheck(obj, GF.tensor_type);
}

/* True for a slot that is None or unset. */
static inline int
gf_is_none(PyObject *value)
{
    return value == NULL || value == Py_None;
}

/* True while a hook list or anomaly detection needs every op to take the
   Python path of Function.apply. */
int gf_forward_hooked(void);

/* tensor.c */
PyObject *gf_new_tensor(PyObject *data, PyObject *grad_fn, Py_ssize_t out_index);
PyObject *gf_edge_of(PyObject *tensor);
PyObject *gf_meta_of(PyArrayObject *array);
PyObject *gf_meta_of_tensor(PyObject *tensor, PyArrayObject *array);
int gf_meta_matches(PyObject *meta, PyArrayObject *array);
int gf_view_is_current(PyObject *tensor);

/* ops.c */
extern PyTypeObject GF_FastOpType;
int gf_ops_bind(PyObject *functions, PyObject *ufuncs);
int gf_op_backward(PyObject *node, PyObject *op_code, PyObject *grad,
                   PyObject **grad_inputs, Py_ssize_t n_inputs);

/* kernels.c: elementwise loops on small contiguous arrays. Each returns a new
   array, or NULL with no error set when the loop raised a floating-point
   exception, so that the caller recomputes through NumPy, which reports it
   as np.errstate sets. */
PyArrayObject *gf_loop_binary(int op, PyArrayObject *a, PyArrayObject *b);
PyArrayObject *gf_loop_scalar(int op, PyArrayObject *a, double scalar, int scalar_first);
PyArrayObject *gf_loop_neg(PyArrayObject *a);
PyArrayObject *gf_loop_activation_grad(int op, PyArrayObject *saved, PyArrayObject *grad);
int gf_loop_fits(PyArrayObject *a);
/* A loop's result as the NumPy operation it replaces returns it: a NumPy
   scalar when 0-d. Steals `out`. */
PyObject *gf_loop_result(PyArrayObject *out);
int gf_loop_same_layout(PyArrayObject *a, PyArrayObject *b);

/* tape.c */
PyObject *gf_new_context(PyObject *function, PyObject *needs_input_grad);
int gf_set_inputs(PyObject *ctx, PyObject *const *args, const char *needs,
                  Py_ssize_t n, int share);
int gf_set_saved(PyObject *ctx, PyObject *const *args, PyObject *const *values,
                 Py_ssize_t nargs, PyObject *const *raw, Py_ssize_t nraw,
                 PyObject *const *outputs, PyObject *const *results, Py_ssize_t n_out);
PyObject *gf_apply(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames);

/* records.c */
int gf_untrack_record(PyObject *ctx);
void gf_record_base_dealloc(PyObject *record);
PyObject *gf_track_records(PyObject *self, PyObject *unused);
PyObject *gf_records_tracked(PyObject *self, PyObject *unused);
/* Track records from now on if `ctx` keeps an object that could refer to a
   later tensor (see records.c). */
int gf_note_record(PyObject *ctx);
PyObject *gf_py_note_record(PyObject *self, PyObject *ctx);
/* The record base's setattr: an attribute set after the record was made
   gets the check that gf_note_record makes. */
int gf_record_setattro(PyObject *record, PyObject *name, PyObject *value);

/* engine.c */
PyObject *gf_run_backward(PyObject *self, PyObject *args);

/* The C base class of gradflow.autograd.Context. The running backward walk
   keeps the record's place here, so that finding it costs no table lookup. */
typedef struct gf_record_base {
    PyObject_HEAD
    /* The low 32 bits of the serial of the walk that entered the record,
       and the record's index in that walk's states. With 32 bits each, a
       record takes 192 bytes instead of 208. A walk checks that the state
       it finds refers to this record, so a serial that wrapped around is
       harmless. */
    uint32_t walk;
    int32_t state;
    /* Links of the list of untracked records (records.c); NULL when the
       record is not on it. The list owns no references. */
    struct gf_record_base *prev_untracked, *next_untracked;
} gf_record_base;

extern PyTypeObject GF_RecordBaseType;

/* arenas.c */
PyObject *gf_cache_arenas(PyObject *self, PyObject *limit_mb);
PyObject *gf_arena_cache_info(PyObject *self, PyObject *unused);

#endif
