/* Tensors and the pieces of a record that point at them. */
#include "gradflow.h"

/* A new Tensor around `data`, as gradflow._tensor.make_tensor builds it:
   no gradient, no hooks, not a view, a fresh version counter [0], and
   requires_grad exactly when it has a grad_fn. */
PyObject *
gf_new_tensor(PyObject *data, PyObject *grad_fn, Py_ssize_t out_index)
{
    PyObject *version = PyList_New(1);
    if (version == NULL) {
        return NULL;
    }
    PyObject *index = PyLong_FromSsize_t(out_index);
    if (index == NULL) {
        Py_DECREF(version);
        return NULL;
    }
    PyObject *zero = PyLong_FromLong(0);
    PyList_SET_ITEM(version, 0, zero);
    /* Holding only an int, the counter can never be part of a reference
       cycle, so the cyclic collector need not visit it. */
    PyObject_GC_UnTrack(version);

    PyObject *t = GF.tensor_type->tp_alloc(GF.tensor_type, 0);
    if (t == NULL) {
        Py_DECREF(version);
        Py_DECREF(index);
        return NULL;
    }
    int records = !gf_is_none(grad_fn);
    gf_set(t, GF.t.data, data);
    gf_set(t, GF.t.grad, Py_None);
    gf_set(t, GF.t.grad_fn, records ? grad_fn : Py_None);
    gf_set_steal(t, GF.t.out_index, index);
    gf_set(t, GF.t.requires_grad, records ? Py_True : Py_False);
    gf_set_steal(t, GF.t.version, version);
    gf_set(t, GF.t.hooks, Py_None);
    gf_set(t, GF.t.view, Py_None);
    gf_set(t, GF.t.grad_buffer, Py_None);
    return t;
}

/* The edge a record keeps to an input that needs a gradient: the leaf
   Tensor itself, or (grad_fn, output index) of the record that made it. */
PyObject *
gf_edge_of(PyObject *tensor)
{
    PyObject *grad_fn = gf_get(tensor, GF.t.grad_fn);
    if (gf_is_none(grad_fn)) {
        Py_INCREF(tensor);
        return tensor;
    }
    PyObject *index = gf_get(tensor, GF.t.out_index);
    if (index == NULL) {
        PyErr_SetString(PyExc_AttributeError, "Tensor has no _out_index");
        return NULL;
    }
    return PyTuple_Pack(2, grad_fn, index);
}

/* (shape, dtype) of an array, as records keep it for each input and output.
   It contains no container, so it is untracked by the cyclic collector. */
PyObject *
gf_meta_of(PyArrayObject *array)
{
    int ndim = PyArray_NDIM(array);
    npy_intp *dims = PyArray_DIMS(array);
    PyObject *shape = PyTuple_New(ndim);
    if (shape == NULL) {
        return NULL;
    }
    for (int i = 0; i < ndim; i++) {
        PyObject *n = PyLong_FromSsize_t(dims[i]);
        if (n == NULL) {
            Py_DECREF(shape);
            return NULL;
        }
        PyTuple_SET_ITEM(shape, i, n);
    }
    PyObject_GC_UnTrack(shape);
    PyObject *meta = PyTuple_Pack(2, shape, (PyObject *)PyArray_DESCR(array));
    Py_DECREF(shape);
    if (meta != NULL) {
        PyObject_GC_UnTrack(meta);
    }
    return meta;
}

/* 1 if `meta` is (shape, dtype) of `array`. */
int
gf_meta_matches(PyObject *meta, PyArrayObject *array)
{
    if (!PyTuple_CheckExact(meta) || PyTuple_GET_SIZE(meta) != 2
            || PyTuple_GET_ITEM(meta, 1) != (PyObject *)PyArray_DESCR(array)) {
        return 0;
    }
    PyObject *shape = PyTuple_GET_ITEM(meta, 0);
    int ndim = PyArray_NDIM(array);
    if (!PyTuple_CheckExact(shape) || PyTuple_GET_SIZE(shape) != ndim) {
        return 0;
    }
    for (int i = 0; i < ndim; i++) {
        PyObject *n = PyTuple_GET_ITEM(shape, i);
        if (!PyLong_CheckExact(n) || PyLong_AsSsize_t(n) != PyArray_DIMS(array)[i]) {
            return 0;
        }
    }
    return 1;
}

/* The (shape, dtype) of a tensor's array. The record that made the tensor
   already keeps an equal tuple for that output, and it is shared. */
PyObject *
gf_meta_of_tensor(PyObject *tensor, PyArrayObject *array)
{
    PyObject *grad_fn = gf_get(tensor, GF.t.grad_fn);
    if (!gf_is_none(grad_fn) && Py_IS_TYPE(grad_fn, GF.context_type)) {
        PyObject *out_meta = gf_get(grad_fn, GF.c.out_meta);
        PyObject *index = gf_get(tensor, GF.t.out_index);
        if (out_meta != NULL && PyTuple_CheckExact(out_meta) && index != NULL
                && PyLong_CheckExact(index)) {
            Py_ssize_t i = PyLong_AsSsize_t(index);
            if (i >= 0 && i < PyTuple_GET_SIZE(out_meta)) {
                PyObject *meta = PyTuple_GET_ITEM(out_meta, i);
                if (gf_meta_matches(meta, array)) {
                    Py_INCREF(meta);
                    return meta;
                }
            }
        }
    }
    return gf_meta_of(array);
}

/* False for a view whose base changed since the view was taken; such a
   tensor takes the Python path, which takes the view again first. */
int
gf_view_is_current(PyObject *tensor)
{
    PyObject *view = gf_get(tensor, GF.t.view);
    if (gf_is_none(view)) {
        return 1;
    }
    PyObject *version = gf_get(tensor, GF.t.version);
    if (!PyTuple_CheckExact(view) || PyTuple_GET_SIZE(view) < 4
            || version == NULL || !PyList_CheckExact(version)
            || PyList_GET_SIZE(version) < 1) {
        return 0;
    }
    PyObject *version_at_view = PyTuple_GET_ITEM(view, 3);
    PyObject *now = PyList_GET_ITEM(version, 0);
    if (version_at_view == now) {
        return 1;
    }
    int equal = PyObject_RichCompareBool(version_at_view, now, Py_EQ);
    if (equal < 0) {
        PyErr_Clear();
        return 0;
    }
    return equal;
}
