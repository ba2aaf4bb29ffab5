/* Function.apply in C, and the record-building steps it shares with the
 * fast elementwise ops.
 *
 * gradflow.autograd.Function.apply (Python) is the reference. The C apply
 * runs the same steps for the common case: no forward hook, no saved-tensor
 * hooks, no record hooks and no anomaly detection. It calls the Python
 * method for every other case, so those features keep one implementation.
 * forward and backward stay the Function's own Python code; what moves to C
 * is the bookkeeping around them (argument scan, record, output tensors).
 */
#include "gradflow.h"

/* (index, counter, counter[0]): a version entry of a saved value. The
   counter is a one-element list, or a view into a GradientBuffer's array. */
static int
append_version(PyObject *versions, Py_ssize_t index, PyObject *counter)
{
    PyObject *now = PySequence_GetItem(counter, 0);
    if (now == NULL) {
        return -1;
    }
    PyObject *entry = Py_BuildValue("(nOO)", index, counter, now);
    Py_DECREF(now);
    if (entry == NULL) {
        return -1;
    }
    /* It refers to a version counter and ints, never to a container that
       could lead back to it. */
    PyObject_GC_UnTrack(entry);
    int status = PyList_Append(versions, entry);
    Py_DECREF(entry);
    return status;
}

/* Return the tuple in `*slot` if it has the very items of `tuple`, and
   otherwise `tuple`, which then takes the slot. Steals `tuple`. */
static PyObject *
share_tuple(PyObject **slot, PyObject *tuple)
{
    PyObject *last = *slot;
    int same = last != NULL && PyTuple_GET_SIZE(last) == PyTuple_GET_SIZE(tuple);
    for (Py_ssize_t i = 0; same && i < PyTuple_GET_SIZE(tuple); i++) {
        same = PyTuple_GET_ITEM(last, i) == PyTuple_GET_ITEM(tuple, i);
    }
    if (same) {
        Py_DECREF(tuple);
        return Py_NewRef(last);
    }
    Py_XSETREF(*slot, Py_NewRef(tuple));
    return tuple;
}

/* The last saved values of one or two items that were all None or Python
   numbers, as a product with a number saves (None, 0.5). Numbers refer to
   nothing, so keeping them here keeps nothing else alive. */
static PyObject *shared_numbers[3];

/* Return `saved`, or an equal tuple from shared_numbers. Steals `saved`. */
static PyObject *
share_numbers(PyObject *saved)
{
    Py_ssize_t n = PyTuple_GET_SIZE(saved);
    if (n >= (Py_ssize_t)Py_ARRAY_LENGTH(shared_numbers)) {
        return saved;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyTuple_GET_ITEM(saved, i);
        if (value != Py_None && !PyFloat_CheckExact(value) && !PyLong_CheckExact(value)) {
            return saved;
        }
    }
    return share_tuple(&shared_numbers[n], saved);
}

/* Resolve what forward saved, as _function._resolve_saved does: a saved
   array that is a Tensor argument's array is kept as that Tensor (kind
   "input", with its version), an output as its index, anything else as it
   is (kind None). Version entries of outputs follow those of inputs.

   A record whose kinds are all None shares a tuple of them, and one without
   version entries the empty tuple; one that saved only numbers may share
   its saved values too (share_numbers). A graph of products with a number
   (x * 0.5) then holds two lists and a tuple fewer per record. */
int
gf_set_saved(PyObject *ctx, PyObject *const *args, PyObject *const *values,
             Py_ssize_t nargs, PyObject *const *raw, Py_ssize_t nraw,
             PyObject *const *outputs, PyObject *const *results, Py_ssize_t n_out)
{
    PyObject *saved = PyTuple_New(nraw);
    PyObject *kinds = PyTuple_New(nraw);
    PyObject *versions = PyList_New(0);
    int no_kinds = 1;
    if (saved == NULL || kinds == NULL || versions == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < nraw; i++) {
        PyObject *value = raw[i];
        PyObject *kind = NULL;
        PyObject *counter = NULL;
        for (Py_ssize_t k = 0; k < nargs; k++) {
            if (value == values[k] && gf_is_tensor(args[k])) {
                value = args[k];
                kind = gf_str_input;
                Py_INCREF(kind);
                counter = gf_get(args[k], GF.t.version);
                break;
            }
        }
        for (Py_ssize_t j = 0; kind == NULL && j < n_out; j++) {
            if (value == outputs[j]) {
                kind = PyLong_FromSsize_t(j);
                if (kind == NULL) {
                    goto error;
                }
            }
        }
        if (kind == NULL) {
            kind = Py_None;
            Py_INCREF(kind);
        }
        no_kinds = no_kinds && kind == Py_None;
        Py_INCREF(value);
        PyTuple_SET_ITEM(saved, i, value);
        PyTuple_SET_ITEM(kinds, i, kind);
        if (counter != NULL && append_version(versions, i, counter) < 0) {
            goto error;
        }
    }
    for (Py_ssize_t i = 0; i < nraw; i++) {
        PyObject *kind = PyTuple_GET_ITEM(kinds, i);
        if (PyLong_CheckExact(kind)) {
            PyObject *result = results[PyLong_AsSsize_t(kind)];
            if (append_version(versions, i, gf_get(result, GF.t.version)) < 0) {
                goto error;
            }
        }
    }
    if (no_kinds && nraw <= GF_SHARED_KINDS) {
        Py_SETREF(kinds, Py_NewRef(nraw == 0 ? gf_empty_tuple : gf_no_kinds[nraw]));
    }
    if (PyList_GET_SIZE(versions) == 0) {
        Py_SETREF(versions, Py_NewRef(gf_empty_tuple));
    }
    /* Kinds are strings, ints and None, and version entries refer to no
       graph object, so neither container can be part of a cycle. Nor can
       the saved tuple when it holds only arrays and numbers. */
    PyObject_GC_UnTrack(kinds);
    PyObject_GC_UnTrack(versions);
    int atomic = 1;
    for (Py_ssize_t i = 0; i < nraw; i++) {
        atomic = atomic && !PyObject_IS_GC(PyTuple_GET_ITEM(saved, i));
    }
    if (atomic) {
        PyObject_GC_UnTrack(saved);
        saved = share_numbers(saved);
    }
    gf_set_steal(ctx, GF.c.saved, saved);
    gf_set_steal(ctx, GF.c.saved_kinds, kinds);
    gf_set_steal(ctx, GF.c.saved_versions, versions);
    return 0;

error:
    Py_XDECREF(saved);
    Py_XDECREF(kinds);
    Py_XDECREF(versions);
    return -1;
}

/* (value.shape, value.dtype), for arrays of any kind. */
static PyObject *
meta_of_value(PyObject *value)
{
    if (PyArray_CheckExact(value)) {
        return gf_meta_of((PyArrayObject *)value);
    }
    PyObject *shape = PyObject_GetAttrString(value, "shape");
    if (shape == NULL) {
        return NULL;
    }
    PyObject *dtype = PyObject_GetAttrString(value, "dtype");
    if (dtype == NULL) {
        Py_DECREF(shape);
        return NULL;
    }
    PyObject *meta = PyTuple_Pack(2, shape, dtype);
    Py_DECREF(shape);
    Py_DECREF(dtype);
    return meta;
}

/* The input metadata last shared (see gf_set_inputs), by input count and by
   a mask of the inputs without a gradient (bit k for a None at k). Products
   with a number, (meta, None), and sums, (meta, meta), then do not evict
   each other. */
static PyObject *shared_metas[3][4];

/* Return `metas`, or an equal tuple from shared_metas. Steals `metas`. */
static PyObject *
share_metas(PyObject *metas)
{
    Py_ssize_t n = PyTuple_GET_SIZE(metas);
    if (n >= (Py_ssize_t)Py_ARRAY_LENGTH(shared_metas)) {
        return metas;
    }
    int nones = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        nones |= (PyTuple_GET_ITEM(metas, k) == Py_None) << k;
    }
    return share_tuple(&shared_metas[n][nones], metas);
}

/* Set a record's edges and input_meta, as _function._record does: an edge
   and (shape, dtype) for each input that needs a gradient, None for others.
   The metadata is read from each tensor's array as it is now, after
   forward, as in Python.

   With `share`, the elementwise ops' case, both are tuples (one allocation
   each, and one pointer fewer for backward to follow), and input_meta is
   shared with earlier records that have the same items. Other records get
   lists, because a checkpoint region rewrites its own record's. */
int
gf_set_inputs(PyObject *ctx, PyObject *const *args, const char *needs, Py_ssize_t n,
              int share)
{
    PyObject *edges = share ? PyTuple_New(n) : PyList_New(n);
    PyObject *metas = share ? PyTuple_New(n) : PyList_New(n);
    if (edges == NULL || metas == NULL) {
        goto error;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *edge = Py_None, *meta = Py_None;
        if (needs[k]) {
            edge = gf_edge_of(args[k]);
            if (edge == NULL) {
                goto error;
            }
            PyObject *data = gf_get(args[k], GF.t.data);
            if (data != NULL && PyArray_CheckExact(data)) {
                meta = gf_meta_of_tensor(args[k], (PyArrayObject *)data);
            }
            else if (data != NULL) {
                /* A shape or dtype property may rebind the tensor's data,
                   which would free the array while it is being read. */
                Py_INCREF(data);
                meta = meta_of_value(data);
                Py_DECREF(data);
            }
            if (meta == NULL) {
                Py_DECREF(edge);
                goto error;
            }
        }
        else {
            Py_INCREF(edge);
            Py_INCREF(meta);
        }
        if (share) {
            PyTuple_SET_ITEM(edges, k, edge);
            PyTuple_SET_ITEM(metas, k, meta);
        }
        else {
            PyList_SET_ITEM(edges, k, edge);
            PyList_SET_ITEM(metas, k, meta);
        }
    }
    /* The metadata contains only (shape, dtype) tuples and None. */
    PyObject_GC_UnTrack(metas);
    if (share) {
        metas = share_metas(metas);
    }
    gf_set_steal(ctx, GF.c.edges, edges);
    gf_set_steal(ctx, GF.c.input_meta, metas);
    return 0;

error:
    Py_XDECREF(edges);
    Py_XDECREF(metas);
    return -1;
}

/* A new record of `function`, with the defaults of Context.__init__. */
PyObject *
gf_new_context(PyObject *function, PyObject *needs_input_grad)
{
    PyObject *ctx = GF.context_type->tp_alloc(GF.context_type, 0);
    if (ctx == NULL) {
        return NULL;
    }
    gf_set(ctx, GF.c.function, function);
    gf_set(ctx, GF.c.needs_input_grad, needs_input_grad);
    gf_set(ctx, GF.c.saved, gf_empty_tuple);
    gf_set(ctx, GF.c.saved_kinds, Py_None);
    gf_set(ctx, GF.c.released, Py_False);
    gf_set(ctx, GF.c.hooks, Py_None);
    gf_set(ctx, GF.c.retained, Py_None);
    gf_set(ctx, GF.c.op, Py_None);
    return ctx;
}

/* A Tensor around a forward result, as make_tensor builds it. Arrays are
   wrapped here; anything else (a NumPy scalar, a CuPy array) goes through
   the Python make_tensor, which decides what to convert. */
static PyObject *
wrap_output(PyObject *value, PyObject *grad_fn, Py_ssize_t index)
{
    if (PyArray_Check(value)) {
        return gf_new_tensor(value, grad_fn, index);
    }
    PyObject *index_object = PyLong_FromSsize_t(index);
    if (index_object == NULL) {
        return NULL;
    }
    PyObject *t = PyObject_CallFunctionObjArgs(
        GF.make_tensor, value, grad_fn ? grad_fn : Py_None, index_object, NULL);
    Py_DECREF(index_object);
    return t;
}

/* Python's check that forward returned arrays: `type(o) is ndarray or
   hasattr(o, "shape")`, where hasattr lets errors other than
   AttributeError through. */
static int
check_output(PyObject *function, PyObject *value)
{
    if (PyArray_CheckExact(value)) {
        return 0;
    }
    PyObject *shape = PyObject_GetAttrString(value, "shape");
    if (shape != NULL) {
        Py_DECREF(shape);
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
        return -1;
    }
    PyErr_Clear();
    PyObject *name = PyObject_GetAttrString(function, "__name__");
    PyObject *type_name = PyObject_GetAttrString((PyObject *)Py_TYPE(value), "__name__");
    if (name != NULL && type_name != NULL) {
        PyErr_Format(PyExc_TypeError,
                     "forward of '%U' returned a %U; it must return an array "
                     "(NumPy or CuPy) or a tuple of arrays.", name, type_name);
    }
    Py_XDECREF(name);
    Py_XDECREF(type_name);
    return -1;
}

/* Remove and return (as a new reference) the arrays that forward named in
   mark_non_differentiable, from the record's __dict__. Returns NULL when
   there are none, or with an exception set on error. */
static PyObject *
take_non_diff(PyObject *ctx)
{
    PyObject **dict = _PyObject_GetDictPtr(ctx);
    if (dict == NULL || *dict == NULL) {
        return NULL;
    }
    PyObject *non_diff = PyDict_GetItemWithError(*dict, gf_str_non_diff);
    if (non_diff == NULL) {
        return NULL;
    }
    Py_INCREF(non_diff);
    if (PyDict_DelItem(*dict, gf_str_non_diff) < 0) {
        Py_DECREF(non_diff);
        return NULL;
    }
    return non_diff;
}

/* The steps of Function.apply after forward returned `out`: the record's
   edges and metadata, the output tensors, the saved values. */
static PyObject *
record_outputs(PyObject *ctx, PyObject *cls, PyObject *const *inputs,
               PyObject *const *values, const char *needs, Py_ssize_t n,
               PyObject *out)
{
    int is_tuple = PyTuple_CheckExact(out);
    Py_ssize_t n_out = is_tuple ? PyTuple_GET_SIZE(out) : 1;
    PyObject *const *outputs = is_tuple ? &PyTuple_GET_ITEM(out, 0) : &out;
    /* The first input array that needs a gradient, held, since reading the
       outputs' metadata may run Python code that rebinds the input's data
       and so frees that array. */
    PyObject *first = NULL;
    PyObject *out_meta = PyTuple_New(n_out);
    PyObject *results = PyTuple_New(n_out);
    if (out_meta == NULL || results == NULL
            || gf_set_inputs(ctx, inputs, needs, n, 0) < 0) {
        goto error;
    }
    for (Py_ssize_t k = 0; k < n && first == NULL; k++) {
        if (needs[k]) {
            first = gf_get(inputs[k], GF.t.data);
        }
    }
    Py_XINCREF(first);
    for (Py_ssize_t j = 0; j < n_out; j++) {
        PyObject *meta = meta_of_value(outputs[j]);
        if (meta == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(out_meta, j, meta);
    }
    PyObject_GC_UnTrack(out_meta);

    PyObject *array_module;
    if (first == NULL) {
        PyErr_SetString(PyExc_AttributeError, "Tensor has no data");
        goto error;
    }
    if (PyArray_CheckExact(first)) {
        array_module = GF.numpy;
        Py_INCREF(array_module);
    }
    else {
        array_module = PyObject_CallOneArg(GF.array_module_of, first);
        if (array_module == NULL) {
            goto error;
        }
    }
    Py_CLEAR(first);
    gf_set_steal(ctx, GF.c.array_module, array_module);
    gf_set_steal(ctx, GF.c.out_meta, out_meta);
    out_meta = NULL;

    for (Py_ssize_t j = 0; j < n_out; j++) {
        PyObject *t = wrap_output(outputs[j], ctx, j);
        if (t == NULL) {
            goto error;
        }
        PyTuple_SET_ITEM(results, j, t);
    }

    PyObject *non_diff = take_non_diff(ctx);
    if (non_diff == NULL && PyErr_Occurred()) {
        goto error;
    }
    if (non_diff == Py_None) {
        Py_CLEAR(non_diff);
    }
    if (non_diff != NULL) {
        PyObject *seq = PySequence_Fast(non_diff, "mark_non_differentiable takes arrays");
        Py_DECREF(non_diff);
        if (seq == NULL) {
            goto error;
        }
        for (Py_ssize_t j = 0; j < n_out; j++) {
            PyObject *t = PyTuple_GET_ITEM(results, j);
            PyObject *data = gf_get(t, GF.t.data);
            for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
                if (PySequence_Fast_GET_ITEM(seq, i) == data) {
                    gf_set(t, GF.t.grad_fn, Py_None);
                    gf_set(t, GF.t.requires_grad, Py_False);
                    break;
                }
            }
        }
        Py_DECREF(seq);
    }

    PyObject *saved = gf_get(ctx, GF.c.saved);
    int has_saved = saved != NULL ? PyObject_IsTrue(saved) : 0;
    if (has_saved < 0) {
        goto error;
    }
    if (has_saved) {
        PyObject *raw = PySequence_Tuple(saved);
        if (raw == NULL) {
            goto error;
        }
        int status = gf_set_saved(ctx, inputs, values, n, &PyTuple_GET_ITEM(raw, 0),
                                  PyTuple_GET_SIZE(raw), outputs,
                                  &PyTuple_GET_ITEM(results, 0), n_out);
        Py_DECREF(raw);
        if (status < 0) {
            goto error;
        }
    }
    if (gf_note_record(ctx) < 0) {
        goto error;
    }
    if (is_tuple) {
        return results;
    }
    PyObject *result = PyTuple_GET_ITEM(results, 0);
    Py_INCREF(result);
    Py_DECREF(results);
    return result;

error:
    Py_XDECREF(first);
    Py_XDECREF(out_meta);
    Py_XDECREF(results);
    return NULL;
}

static PyObject *
unrecorded_outputs(PyObject *out)
{
    if (!PyTuple_CheckExact(out)) {
        return wrap_output(out, NULL, 0);
    }
    Py_ssize_t n_out = PyTuple_GET_SIZE(out);
    PyObject *results = PyTuple_New(n_out);
    if (results == NULL) {
        return NULL;
    }
    for (Py_ssize_t j = 0; j < n_out; j++) {
        PyObject *t = wrap_output(PyTuple_GET_ITEM(out, j), NULL, 0);
        if (t == NULL) {
            Py_DECREF(results);
            return NULL;
        }
        PyTuple_SET_ITEM(results, j, t);
    }
    return results;
}

/* Call each unrecorded hook with the Tensor arguments, as Python does for
   an op that ran unrecorded although an input requires grad. */
static int
run_unrecorded_hooks(PyObject *const *inputs, Py_ssize_t n)
{
    PyObject *tensors = PyList_New(0);
    if (tensors == NULL) {
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        if (gf_is_tensor(inputs[k]) && PyList_Append(tensors, inputs[k]) < 0) {
            Py_DECREF(tensors);
            return -1;
        }
    }
    PyObject *hooks = PySequence_Tuple(GF.unrecorded_hooks);
    int status = hooks == NULL ? -1 : 0;
    for (Py_ssize_t i = 0; status == 0 && i < PyTuple_GET_SIZE(hooks); i++) {
        PyObject *r = PyObject_CallOneArg(PyTuple_GET_ITEM(hooks, i), tensors);
        status = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    }
    Py_XDECREF(hooks);
    Py_DECREF(tensors);
    return status;
}

/* Python's test `arg._view is not None and arg._view[3] != arg._version[0]`:
   1 if the view is stale, 0 if not, -1 on error. */
static int
view_is_stale(PyObject *tensor)
{
    PyObject *view = gf_get(tensor, GF.t.view);
    if (gf_is_none(view)) {
        return 0;
    }
    if (gf_view_is_current(tensor)) {
        return 0;
    }
    PyObject *version_at_view = PySequence_GetItem(view, 3);
    PyObject *version = gf_get(tensor, GF.t.version);
    PyObject *now = version ? PySequence_GetItem(version, 0) : NULL;
    int stale = -1;
    if (version_at_view != NULL && now != NULL) {
        stale = PyObject_RichCompareBool(version_at_view, now, Py_NE);
    }
    Py_XDECREF(version_at_view);
    Py_XDECREF(now);
    return stale;
}

static PyObject *
call_python_apply(PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    return PyObject_Vectorcall(GF.python_apply, args, nargsf, kwnames);
}

PyObject *
gf_apply(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "apply() needs the Function class");
        return NULL;
    }
    if (!GF.bound) {
        PyErr_SetString(PyExc_RuntimeError, "gradflow._C is not bound yet");
        return NULL;
    }
    if (!GF.fast_ops || gf_forward_hooked()
            || PyList_GET_SIZE(GF.saved_tensors_hooks) != 0
            || PyList_GET_SIZE(GF.record_hooks) != 0) {
        return call_python_apply(args, nargs, kwnames);
    }
    PyObject *cls = args[0];
    PyObject *const *inputs = args + 1;
    Py_ssize_t n = nargs - 1;
    Py_ssize_t n_kw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;

    /* forward(ctx, *arrays, **kwargs), in vectorcall layout. */
    PyObject *small[16];
    char small_needs[16];
    PyObject **call = n + n_kw + 1 <= 16
        ? small : PyMem_Malloc((n + n_kw + 1) * sizeof(PyObject *));
    char *needs = n <= 16 ? small_needs : PyMem_Malloc(n);
    PyObject *ctx = NULL, *forward = NULL, *out = NULL, *result = NULL;
    PyObject *needs_tuple = NULL;
    Py_ssize_t n_values = 0;     /* values that hold a reference so far */
    if (call == NULL || needs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* The call holds a reference to each value, because forward is Python
       code, which could rebind a tensor's array while it runs. */
    PyObject **values = call + 1;
    int requires = 0, off_cpu = 0;
    Py_ssize_t tensor_count = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *arg = inputs[k];
        needs[k] = 0;
        Py_INCREF(arg);
        values[k] = arg;
        n_values = k + 1;
        if (!gf_is_tensor(arg)) {
            continue;
        }
        int stale = view_is_stale(arg);
        if (stale < 0) {
            goto done;
        }
        if (stale) {
            PyObject *r = PyObject_CallOneArg(GF.refresh_view, arg);
            if (r == NULL) {
                goto done;
            }
            Py_DECREF(r);
        }
        PyObject *data = gf_get(arg, GF.t.data);
        if (data == NULL) {
            PyErr_SetString(PyExc_AttributeError, "Tensor has no data");
            goto done;
        }
        Py_INCREF(data);
        Py_SETREF(values[k], data);
        tensor_count++;
        off_cpu |= !PyArray_CheckExact(data);
        needs[k] = gf_get(arg, GF.t.requires_grad) == Py_True;
        requires |= needs[k];
    }
    if (off_cpu && tensor_count > 1) {
        PyObject *tensors = PyList_New(0);
        if (tensors == NULL) {
            goto done;
        }
        for (Py_ssize_t k = 0; k < n; k++) {
            if (gf_is_tensor(inputs[k]) && PyList_Append(tensors, inputs[k]) < 0) {
                Py_DECREF(tensors);
                goto done;
            }
        }
        PyObject *r = PyObject_CallFunctionObjArgs(GF.check_devices, cls, tensors, NULL);
        Py_DECREF(tensors);
        if (r == NULL) {
            goto done;
        }
        Py_DECREF(r);
    }
    int record_it = requires && gf_grad_enabled();
    needs_tuple = PyTuple_New(n);
    if (needs_tuple == NULL) {
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *flag = record_it && needs[k] ? Py_True : Py_False;
        Py_INCREF(flag);
        PyTuple_SET_ITEM(needs_tuple, k, flag);
    }
    ctx = gf_new_context(cls, needs_tuple);
    forward = ctx ? PyObject_GetAttr(cls, gf_str_forward) : NULL;
    if (forward == NULL) {
        goto done;
    }
    call[0] = ctx;
    for (Py_ssize_t i = 0; i < n_kw; i++) {
        call[1 + n + i] = args[nargs + i];
    }
    out = PyObject_Vectorcall(forward, call, n + 1, kwnames);
    if (out == NULL) {
        goto done;
    }
    if (PyTuple_CheckExact(out)) {
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(out); j++) {
            if (check_output(cls, PyTuple_GET_ITEM(out, j)) < 0) {
                goto done;
            }
        }
    }
    else if (check_output(cls, out) < 0) {
        goto done;
    }
    if (!record_it) {
        if (requires && PyList_GET_SIZE(GF.unrecorded_hooks) != 0
                && run_unrecorded_hooks(inputs, n) < 0) {
            goto done;
        }
        result = unrecorded_outputs(out);
    }
    else {
        result = record_outputs(ctx, cls, inputs, values, needs, n, out);
    }

done:
    for (Py_ssize_t k = 0; k < n_values; k++) {
        Py_DECREF(call[1 + k]);
    }
    if (call != NULL && call != small) {
        PyMem_Free(call);
    }
    if (needs != NULL && needs != small_needs) {
        PyMem_Free(needs);
    }
    Py_XDECREF(needs_tuple);
    Py_XDECREF(forward);
    Py_XDECREF(out);
    Py_XDECREF(ctx);
    return result;
}
