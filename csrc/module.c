/* gradflow._C: module setup, binding to gradflow's classes, and grad mode. */
#define GRADFLOW_MODULE_C
#include "gradflow.h"

#include <structmember.h>

gf_state GF;

PyObject *gf_str_input;
PyObject *gf_str_backward;
PyObject *gf_str_forward;
PyObject *gf_str_release;
PyObject *gf_str_anomaly_hook;
PyObject *gf_str_non_diff;
PyObject *gf_str_dot;
PyObject *gf_str_gradflow_prefix;
PyObject *gf_empty_tuple;
PyObject *gf_no_kinds[GF_SHARED_KINDS + 1];
PyObject *gf_needs[3][3];

/* -- grad mode ---------------------------------------------------------------- */

/* Zero, the initial value of every thread, means recording is on. */
static _Thread_local int grad_disabled;

int
gf_grad_enabled(void)
{
    return !grad_disabled;
}

void
gf_set_grad_enabled(int enabled)
{
    grad_disabled = !enabled;
}

static PyObject *
py_is_grad_enabled(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(gf_grad_enabled());
}

static PyObject *
py_set_grad_enabled(PyObject *self, PyObject *flag)
{
    int enabled = PyObject_IsTrue(flag);
    if (enabled < 0) {
        return NULL;
    }
    gf_set_grad_enabled(enabled);
    Py_RETURN_NONE;
}

int
gf_forward_hooked(void)
{
    if (PyList_GET_SIZE(GF.forward_hooks) != 0) {
        return 1;
    }
    PyObject *hook = PyDict_GetItemWithError(GF.function_globals, gf_str_anomaly_hook);
    if (hook == NULL) {
        PyErr_Clear();
        return 1;
    }
    return hook != Py_None;
}

static PyObject *
py_set_fast_ops(PyObject *self, PyObject *flag)
{
    int enabled = PyObject_IsTrue(flag);
    if (enabled < 0) {
        return NULL;
    }
    int previous = GF.fast_ops;
    GF.fast_ops = enabled;
    return PyBool_FromLong(previous);
}

/* -- binding ------------------------------------------------------------------ */

/* The offset of the __slots__ entry `name` of a Python class, checked to be
   an object slot of that very class. */
static int
slot_offset(PyTypeObject *type, const char *name, Py_ssize_t *offset)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name);
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "bind: %s.%s is not a __slots__ entry",
                     type->tp_name, name);
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX || PyDescr_TYPE(descr) != type) {
        PyErr_Format(PyExc_TypeError, "bind: %s.%s is not an object slot of that class",
                     type->tp_name, name);
        return -1;
    }
    *offset = member->offset;
    return 0;
}

static int
bind_slots(void)
{
    PyTypeObject *t = GF.tensor_type, *c = GF.context_type;
    gf_tensor_slots *ts = &GF.t;
    gf_context_slots *cs = &GF.c;
    if (slot_offset(t, "data", &ts->data) < 0
            || slot_offset(t, "_grad", &ts->grad) < 0
            || slot_offset(t, "grad_fn", &ts->grad_fn) < 0
            || slot_offset(t, "_out_index", &ts->out_index) < 0
            || slot_offset(t, "_requires_grad", &ts->requires_grad) < 0
            || slot_offset(t, "_version", &ts->version) < 0
            || slot_offset(t, "_hooks", &ts->hooks) < 0
            || slot_offset(t, "_view", &ts->view) < 0
            || slot_offset(t, "_grad_buffer", &ts->grad_buffer) < 0) {
        return -1;
    }
    if (slot_offset(c, "function", &cs->function) < 0
            || slot_offset(c, "edges", &cs->edges) < 0
            || slot_offset(c, "input_meta", &cs->input_meta) < 0
            || slot_offset(c, "needs_input_grad", &cs->needs_input_grad) < 0
            || slot_offset(c, "out_meta", &cs->out_meta) < 0
            || slot_offset(c, "saved", &cs->saved) < 0
            || slot_offset(c, "_saved_kinds", &cs->saved_kinds) < 0
            || slot_offset(c, "_saved_versions", &cs->saved_versions) < 0
            || slot_offset(c, "_released", &cs->released) < 0
            || slot_offset(c, "_hooks", &cs->hooks) < 0
            || slot_offset(c, "_retained", &cs->retained) < 0
            || slot_offset(c, "xp", &cs->xp) < 0
            || slot_offset(c, "array_module", &cs->array_module) < 0
            || slot_offset(c, "_op", &cs->op) < 0) {
        return -1;
    }
    return 0;
}

static int
take_list(PyObject *globals, const char *name, PyObject **target)
{
    PyObject *value = PyDict_GetItemString(globals, name);
    if (value == NULL || !PyList_CheckExact(value)) {
        PyErr_Format(PyExc_TypeError, "bind: _function.%s must be a list", name);
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(*target, value);
    return 0;
}

static int
take_callable(PyObject *dict, const char *name, PyObject **target)
{
    PyObject *value = PyDict_GetItemString(dict, name);
    if (value == NULL || !PyCallable_Check(value)) {
        PyErr_Format(PyExc_TypeError, "bind: %s must be a callable", name);
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(*target, value);
    return 0;
}

static PyObject *
py_bind(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "tensor", "context", "function_globals", "engine_globals", "functions",
        "ufuncs", "numpy", "numpy_namespace", "array_namespace",
        "stable_sigmoid", "small_size", "helpers", "inert_types", NULL,
    };
    PyObject *tensor, *context, *function_globals, *engine_globals, *functions,
        *ufuncs, *numpy, *numpy_namespace, *array_namespace, *stable_sigmoid,
        *helpers, *inert_types;
    Py_ssize_t small_size;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "O!O!O!O!O!O!OOOOnO!O!:bind", keywords,
            &PyType_Type, &tensor, &PyType_Type, &context,
            &PyDict_Type, &function_globals, &PyDict_Type, &engine_globals,
            &PyDict_Type, &functions, &PyDict_Type, &ufuncs, &numpy,
            &numpy_namespace, &array_namespace, &stable_sigmoid, &small_size,
            &PyDict_Type, &helpers, &PyTuple_Type, &inert_types)) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(inert_types); i++) {
        if (!PyType_Check(PyTuple_GET_ITEM(inert_types, i))) {
            PyErr_SetString(PyExc_TypeError, "bind: inert_types must hold classes");
            return NULL;
        }
    }
    Py_INCREF(inert_types);
    Py_XSETREF(GF.inert_types, inert_types);
    GF.bound = 0;
    Py_INCREF(tensor);
    Py_XSETREF(GF.tensor_type, (PyTypeObject *)tensor);
    Py_INCREF(context);
    Py_XSETREF(GF.context_type, (PyTypeObject *)context);
    GF.records_have_base = PyType_IsSubtype(GF.context_type, &GF_RecordBaseType);
    Py_INCREF(function_globals);
    Py_XSETREF(GF.function_globals, function_globals);
    Py_INCREF(numpy);
    Py_XSETREF(GF.numpy, numpy);
    Py_INCREF(numpy_namespace);
    Py_XSETREF(GF.numpy_namespace, numpy_namespace);
    Py_INCREF(array_namespace);
    Py_XSETREF(GF.array_namespace, array_namespace);
    Py_INCREF(stable_sigmoid);
    Py_XSETREF(GF.stable_sigmoid, stable_sigmoid);
    GF.small_size = small_size;
    if (bind_slots() < 0
            || take_list(function_globals, "record_hooks", &GF.record_hooks) < 0
            || take_list(function_globals, "unrecorded_hooks", &GF.unrecorded_hooks) < 0
            || take_list(function_globals, "forward_hooks", &GF.forward_hooks) < 0
            || take_list(function_globals, "release_hooks", &GF.release_hooks) < 0
            || take_list(function_globals, "saved_tensors_hooks",
                         &GF.saved_tensors_hooks) < 0
            || take_callable(engine_globals, "_collect_output_grads",
                             &GF.collect_output_grads) < 0
            || take_callable(engine_globals, "_run_output_hooks", &GF.run_output_hooks) < 0
            || take_callable(engine_globals, "_fit_to_input", &GF.fit_to_input) < 0
            || take_callable(engine_globals, "_store_leaf_grads", &GF.store_leaf_grads) < 0
            || take_callable(engine_globals, "_raise_gradient_count",
                             &GF.raise_gradient_count) < 0
            || take_callable(engine_globals, "_sum_grads", &GF.sum_grads) < 0
            || take_callable(helpers, "python_apply", &GF.python_apply) < 0
            || take_callable(helpers, "make_tensor", &GF.make_tensor) < 0
            || take_callable(helpers, "array_module", &GF.array_module_of) < 0
            || take_callable(helpers, "refresh_view", &GF.refresh_view) < 0
            || take_callable(helpers, "check_devices", &GF.check_devices) < 0
            || gf_ops_bind(functions, ufuncs) < 0) {
        return NULL;
    }
    GF.bound = 1;
    Py_RETURN_NONE;
}

/* -- module ------------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))py_bind, METH_VARARGS | METH_KEYWORDS,
     "Bind the extension to gradflow's classes, hook lists and helpers."},
    {"is_grad_enabled", py_is_grad_enabled, METH_NOARGS,
     "Return True when new operations are recorded for backward."},
    {"set_grad_enabled", py_set_grad_enabled, METH_O,
     "Turn recording on or off for the calling thread."},
    {"set_fast_ops", py_set_fast_ops, METH_O,
     "Turn the C path of the elementwise ops on or off; returns the previous setting."},
    {"apply", (PyCFunction)(void (*)(void))gf_apply, METH_FASTCALL | METH_KEYWORDS,
     "apply(cls, *args, **kwargs)\n--\n\n"
     "Run ``cls.forward`` on the arrays of ``args`` and record it when needed "
     "(Function.apply, with its bookkeeping in C)."},
    {"track_records", gf_track_records, METH_NOARGS,
     "Put every live and future fast-op record under the cyclic garbage "
     "collector, for the rest of the process."},
    {"note_record", gf_py_note_record, METH_O,
     "Track every record from now on if this new record keeps an object "
     "that could refer to a later tensor."},
    {"records_tracked", gf_records_tracked, METH_NOARGS,
     "Return True once records are tracked by the cyclic garbage collector."},
    {"run_backward", gf_run_backward, METH_VARARGS,
     "run_backward(roots, root_grads, retain_graph)\n--\n\n"
     "Run a plain backward walk and store the leaf gradients."},
    {"cache_arenas", gf_cache_arenas, METH_O,
     "cache_arenas(limit_mb)\n--\n\n"
     "Keep up to ``limit_mb`` MiB of the arenas that Python's object allocator "
     "frees, for reuse without page faults; 0 installs nothing."},
    {"arena_cache_info", gf_arena_cache_info, METH_NOARGS,
     "Return whether the arena cache is installed, the bytes of arenas it "
     "keeps now and its limit in bytes."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gradflow._C",
    .m_doc = "The C core of gradflow: fast elementwise ops, the backward walk "
             "and the grad-mode flag.",
    .m_size = -1,
    .m_methods = module_methods,
};

static int
make_constants(void)
{
    gf_str_input = PyUnicode_InternFromString("input");
    gf_str_backward = PyUnicode_InternFromString("backward");
    gf_str_forward = PyUnicode_InternFromString("forward");
    gf_str_release = PyUnicode_InternFromString("release");
    gf_str_anomaly_hook = PyUnicode_InternFromString("anomaly_hook");
    gf_str_non_diff = PyUnicode_InternFromString("_non_diff");
    gf_str_dot = PyUnicode_InternFromString(".");
    gf_str_gradflow_prefix = PyUnicode_InternFromString("gradflow.");
    gf_empty_tuple = PyTuple_New(0);
    /* needs_input_grad of a recorded op: (True,) for one input; for two,
       (True, True), (True, False) and (False, True). */
    gf_needs[1][0] = PyTuple_Pack(1, Py_True);
    gf_needs[2][0] = PyTuple_Pack(2, Py_True, Py_True);
    gf_needs[2][1] = PyTuple_Pack(2, Py_True, Py_False);
    gf_needs[2][2] = PyTuple_Pack(2, Py_False, Py_True);
    for (Py_ssize_t n = 1; n <= GF_SHARED_KINDS; n++) {
        gf_no_kinds[n] = PyTuple_New(n);
        if (gf_no_kinds[n] == NULL) {
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_INCREF(Py_None);
            PyTuple_SET_ITEM(gf_no_kinds[n], i, Py_None);
        }
    }
    return (gf_str_input && gf_str_backward && gf_str_forward && gf_str_release && gf_str_anomaly_hook
            && gf_str_non_diff
            && gf_str_dot && gf_str_gradflow_prefix && gf_empty_tuple && gf_needs[1][0] && gf_needs[2][0] && gf_needs[2][1]
            && gf_needs[2][2]) ? 0 : -1;
}

PyMODINIT_FUNC
PyInit__C(void)
{
    import_array();
    if (make_constants() < 0 || PyType_Ready(&GF_FastOpType) < 0
            || PyType_Ready(&GF_RecordBaseType) < 0) {
        return NULL;
    }
    GF.fast_ops = 1;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&GF_FastOpType);
    if (PyModule_AddObject(module, "FastOp", (PyObject *)&GF_FastOpType) < 0) {
        Py_DECREF(&GF_FastOpType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&GF_RecordBaseType);
    if (PyModule_AddObject(module, "RecordBase", (PyObject *)&GF_RecordBaseType) < 0) {
        Py_DECREF(&GF_RecordBaseType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
