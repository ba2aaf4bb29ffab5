/* The backward walk of gradflow.autograd._engine._run, in C.
 *
 * It covers a plain backward: gradients into .grad, no create_graph, no
 * gf.grad inputs, no anomaly detection. The Python engine handles the
 * rest. Nodes run in the same order, and gradients sum in the same order,
 * as in the Python walk, so both give bitwise equal results. The rare
 * steps (output hooks, missing output gradients, broadcast gradients,
 * storing leaf gradients) call the same Python helpers.
 */
#include "gradflow.h"

typedef struct {
    PyObject *node;          /* strong reference for the whole walk */
    Py_ssize_t dependencies; /* uses of its outputs not yet delivered */
    char counted;            /* the Python walk's `node in dependencies` */
    char buffered;           /* the Python walk's `node in buffers` */
    Py_ssize_t n_out;
    PyObject *slot0;         /* the gradient buffer when n_out == 1 */
    PyObject **slots;        /* the gradient buffers when n_out > 1 */
} NodeState;

/* The arrays a walk allocates. They are kept from one walk to the next (see
   take_buffers), because a large graph's arrays would otherwise be fresh
   pages from the system on every backward. */
typedef struct {
    NodeState *states;
    Py_ssize_t capacity;
    Py_ssize_t *table;       /* open addressing: state index + 1, 0 empty */
    size_t table_capacity;   /* entries allocated, a power of two */
    Py_ssize_t *ready;
    Py_ssize_t ready_capacity;
    Py_ssize_t *stack;       /* count_dependencies' work list */
    Py_ssize_t stack_capacity;
} Buffers;

typedef struct {
    Buffers buffers;
    Py_ssize_t count;
    unsigned long long serial;
    int stamps;              /* states found through the records, not the table */
    size_t table_size;       /* entries in use, a power of two */
    Py_ssize_t n_ready;
    PyObject *leaf_grads;
    int retain_graph;
} Walk;

/* The buffers of the last walk that finished, NULL arrays when none are
   kept, and the number of records that walk reached, from which the next
   walk sizes its table. A walk that starts while another runs (a hook that
   calls backward) finds them taken and allocates its own. */
static Buffers spare;
static Py_ssize_t last_count;

/* Keep no more than this many bytes of buffers between walks. */
#define SPARE_LIMIT ((size_t)64 << 20)

/* The serial of the last walk that started, and whether a running walk
   keeps its state indices in the records. Only one walk at a time does: a
   walk that starts meanwhile (in a hook, or in another thread while this
   one runs Python code) uses the table. */
static unsigned long long last_serial;
static int stamping;

/* -- records ---------------------------------------------------------------- */

PyTypeObject GF_RecordBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gradflow._C.RecordBase",
    .tp_doc = "The C part of every gradflow.autograd.Context: the running "
              "backward walk's place for the record, and the record's links "
              "in the list of untracked records.",
    .tp_basicsize = sizeof(gf_record_base),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = gf_record_base_dealloc,
    .tp_setattro = gf_record_setattro,
};

/* -- the node table --------------------------------------------------------- */

static size_t
hash_pointer(PyObject *p, size_t mask)
{
    size_t h = (size_t)p >> 4;
    h *= (size_t)0x9E3779B97F4A7C15ULL;
    return (h >> 17) & mask;
}

static Py_ssize_t
find(Walk *w, PyObject *node)
{
    if (w->stamps) {
        if (!PyObject_TypeCheck(node, GF.context_type)) {
            return -1;
        }
        gf_record_base *record = (gf_record_base *)node;
        Py_ssize_t k = record->state;
        if (record->walk != (uint32_t)w->serial || k < 0 || k >= w->count
                || w->buffers.states[k].node != node) {
            return -1;
        }
        return k;
    }
    size_t mask = w->table_size - 1;
    for (size_t i = hash_pointer(node, mask);; i = (i + 1) & mask) {
        Py_ssize_t entry = w->buffers.table[i];
        if (entry == 0) {
            return -1;
        }
        if (w->buffers.states[entry - 1].node == node) {
            return entry - 1;
        }
    }
}

/* Use `size` entries of the table, allocating more if needed, and enter
   every state again, because the states array has every node the table
   had. */
static int
resize_table(Walk *w, size_t size)
{
    if (size > w->buffers.table_capacity) {
        Py_ssize_t *table = PyMem_Malloc(size * sizeof(Py_ssize_t));
        if (table == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        PyMem_Free(w->buffers.table);
        w->buffers.table = table;
        w->buffers.table_capacity = size;
    }
    Py_ssize_t *table = w->buffers.table;
    memset(table, 0, size * sizeof(Py_ssize_t));
    for (Py_ssize_t k = 0; k < w->count; k++) {
        size_t i = hash_pointer(w->buffers.states[k].node, size - 1);
        while (table[i] != 0) {
            i = (i + 1) & (size - 1);
        }
        table[i] = k + 1;
    }
    w->table_size = size;
    return 0;
}

/* Double the capacity of the array `*items` of `item_size`-byte items. */
static int
grow_array(void **items, Py_ssize_t *capacity, size_t item_size)
{
    void *grown = PyMem_Realloc(*items, (size_t)*capacity * 2 * item_size);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *items = grown;
    *capacity *= 2;
    return 0;
}

static Py_ssize_t
insert(Walk *w, PyObject *node)
{
    if (!w->stamps && (size_t)(w->count + 1) * 2 > w->table_size
            && resize_table(w, w->table_size * 2) < 0) {
        return -1;
    }
    if (w->count == w->buffers.capacity
            && grow_array((void **)&w->buffers.states, &w->buffers.capacity,
                          sizeof(NodeState)) < 0) {
        return -1;
    }
    if (w->stamps && w->count == INT32_MAX) {
        PyErr_SetString(PyExc_MemoryError,
                        "backward: the graph has more than 2**31 - 1 records");
        return -1;
    }
    Py_ssize_t k = w->count++;
    NodeState *st = &w->buffers.states[k];
    memset(st, 0, sizeof(*st));
    Py_INCREF(node);
    st->node = node;
    if (w->stamps) {
        /* Both callers of find_or_insert check that `node` is a record. */
        assert(PyObject_TypeCheck(node, GF.context_type));
        ((gf_record_base *)node)->walk = (uint32_t)w->serial;
        ((gf_record_base *)node)->state = (int32_t)k;
        return k;
    }
    size_t mask = w->table_size - 1;
    size_t i = hash_pointer(node, mask);
    while (w->buffers.table[i] != 0) {
        i = (i + 1) & mask;
    }
    w->buffers.table[i] = k + 1;
    return k;
}

static Py_ssize_t
find_or_insert(Walk *w, PyObject *node)
{
    Py_ssize_t k = find(w, node);
    return k >= 0 ? k : insert(w, node);
}

static int
push_ready(Walk *w, Py_ssize_t k)
{
    if (w->n_ready == w->buffers.ready_capacity
            && grow_array((void **)&w->buffers.ready, &w->buffers.ready_capacity,
                          sizeof(Py_ssize_t)) < 0) {
        return -1;
    }
    w->buffers.ready[w->n_ready++] = k;
    return 0;
}

static void
clear_slots(NodeState *st)
{
    Py_CLEAR(st->slot0);
    if (st->slots != NULL) {
        for (Py_ssize_t i = 0; i < st->n_out; i++) {
            Py_CLEAR(st->slots[i]);
        }
        PyMem_Free(st->slots);
        st->slots = NULL;
    }
}

static void
free_buffers(Buffers *b)
{
    PyMem_Free(b->states);
    PyMem_Free(b->table);
    PyMem_Free(b->ready);
    PyMem_Free(b->stack);
    memset(b, 0, sizeof(*b));
}

static size_t
buffer_bytes(const Buffers *b)
{
    return (size_t)b->capacity * sizeof(NodeState)
        + b->table_capacity * sizeof(Py_ssize_t)
        + ((size_t)b->ready_capacity + (size_t)b->stack_capacity) * sizeof(Py_ssize_t);
}

/* Start a walk with the spare buffers, or new ones when a running walk has
   them. A walk that cannot keep its place in the records gets a table sized
   for as many records as the last walk reached. */
static int
take_buffers(Walk *w)
{
    if (spare.states != NULL) {
        w->buffers = spare;
        memset(&spare, 0, sizeof(spare));
    }
    else {
        w->buffers.capacity = w->buffers.ready_capacity = w->buffers.stack_capacity = 64;
        w->buffers.states = PyMem_Malloc(w->buffers.capacity * sizeof(NodeState));
        w->buffers.ready = PyMem_Malloc(w->buffers.ready_capacity * sizeof(Py_ssize_t));
        w->buffers.stack = PyMem_Malloc(w->buffers.stack_capacity * sizeof(Py_ssize_t));
        if (w->buffers.states == NULL || w->buffers.ready == NULL || w->buffers.stack == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    w->serial = ++last_serial;
    w->stamps = GF.records_have_base && !stamping;
    if (w->stamps) {
        stamping = 1;
        return 0;
    }
    size_t size = 256;
    while (size < (size_t)last_count * 2 && size < w->buffers.table_capacity) {
        size *= 2;
    }
    return resize_table(w, size);
}

static void
walk_free(Walk *w)
{
    for (Py_ssize_t k = 0; k < w->count; k++) {
        clear_slots(&w->buffers.states[k]);
        Py_DECREF(w->buffers.states[k].node);
    }
    Py_XDECREF(w->leaf_grads);
    last_count = w->count;
    if (w->stamps) {
        stamping = 0;
    }
    int complete = w->buffers.states && w->buffers.ready && w->buffers.stack;
    if (spare.states == NULL && complete && buffer_bytes(&w->buffers) <= SPARE_LIMIT) {
        spare = w->buffers;
        memset(&w->buffers, 0, sizeof(w->buffers));
    }
    free_buffers(&w->buffers);
}

/* -- gradients ---------------------------------------------------------------- */

/* current + grad, by a C loop or else by the Python engine's _sum_grads,
   so that NumPy's warnings come from gradflow's code either way. */
static PyObject *
accumulate(PyObject *current, PyObject *grad)
{
    if (PyArray_CheckExact(current) && PyArray_CheckExact(grad)) {
        PyArrayObject *a = (PyArrayObject *)current, *b = (PyArrayObject *)grad;
        if (gf_loop_fits(a) && gf_loop_fits(b) && gf_loop_same_layout(a, b)) {
            PyArrayObject *sum = gf_loop_binary(OP_ADD, a, b);
            if (sum != NULL) {
                return gf_loop_result(sum);
            }
        }
    }
    return PyObject_CallFunctionObjArgs(GF.sum_grads, current, grad, NULL);
}

/* Raise the error Python raises for a graph node that is not a record. */
static int
reject_node(PyObject *node)
{
    PyObject *edges = PyObject_GetAttrString(node, "edges");
    if (edges != NULL) {
        Py_DECREF(edges);
        PyErr_Format(PyExc_TypeError,
                     "backward: the graph contains a %.100s where a record "
                     "(gradflow.autograd.Context) belongs", Py_TYPE(node)->tp_name);
    }
    return -1;
}

/* Add `grad` (borrowed) to output `index` of `node`'s buffer. Returns the
   node's state index, or -1 on error. */
static Py_ssize_t
add_to_buffer(Walk *w, PyObject *node, PyObject *index_object, PyObject *grad)
{
    if (!PyObject_TypeCheck(node, GF.context_type)) {
        return reject_node(node);
    }
    Py_ssize_t k = find_or_insert(w, node);
    if (k < 0) {
        return -1;
    }
    Py_ssize_t index = PyLong_AsSsize_t(index_object);
    if (index == -1 && PyErr_Occurred()) {
        return -1;
    }
    NodeState *st = &w->buffers.states[k];
    if (!st->buffered) {
        PyObject *out_meta = gf_get(node, GF.c.out_meta);
        if (out_meta == NULL) {
            PyErr_SetString(PyExc_AttributeError, "record has no out_meta");
            return -1;
        }
        Py_ssize_t n_out = PyObject_Length(out_meta);
        if (n_out < 0) {
            return -1;
        }
        st = &w->buffers.states[k];
        st->buffered = 1;
        st->n_out = n_out;
        if (n_out > 1) {
            st->slots = PyMem_Calloc(n_out, sizeof(PyObject *));
            if (st->slots == NULL) {
                PyErr_NoMemory();
                return -1;
            }
        }
    }
    if (index < 0 || index >= st->n_out) {
        PyErr_Format(PyExc_IndexError,
                     "backward: output index %zd of a record with %zd output(s)",
                     index, st->n_out);
        return -1;
    }
    PyObject **slot = st->n_out == 1 ? &st->slot0 : &st->slots[index];
    if (*slot == NULL) {
        Py_INCREF(grad);
        *slot = grad;
        return k;
    }
    PyObject *sum = accumulate(*slot, grad);
    if (sum == NULL) {
        return -1;
    }
    Py_SETREF(*slot, sum);
    return k;
}

/* 1 if `grad` has the shape and dtype in `meta`, 0 if not, -1 on error. */
static int
matches_meta(PyObject *grad, PyObject *meta)
{
    if (!PyTuple_CheckExact(meta) || PyTuple_GET_SIZE(meta) != 2) {
        return 0;
    }
    PyObject *shape = PyTuple_GET_ITEM(meta, 0), *dtype = PyTuple_GET_ITEM(meta, 1);
    if (PyArray_CheckExact(grad) && PyTuple_CheckExact(shape)) {
        PyArrayObject *array = (PyArrayObject *)grad;
        int ndim = PyArray_NDIM(array);
        if (ndim != PyTuple_GET_SIZE(shape)) {
            return 0;
        }
        int exact = 1;
        for (int i = 0; i < ndim && exact; i++) {
            PyObject *item = PyTuple_GET_ITEM(shape, i);
            /* Other integers (NumPy's) take the comparison below. */
            exact = PyLong_CheckExact(item);
            if (exact) {
                Py_ssize_t n = PyLong_AsSsize_t(item);
                if (n == -1 && PyErr_Occurred()) {
                    return -1;
                }
                if (n != PyArray_DIMS(array)[i]) {
                    return 0;
                }
            }
        }
        if (exact) {
            PyObject *descr = (PyObject *)PyArray_DESCR(array);
            return descr == dtype ? 1 : PyObject_RichCompareBool(descr, dtype, Py_EQ);
        }
    }
    PyObject *grad_shape = PyObject_GetAttrString(grad, "shape");
    if (grad_shape == NULL) {
        return -1;
    }
    int same = PyObject_RichCompareBool(grad_shape, shape, Py_EQ);
    Py_DECREF(grad_shape);
    if (same <= 0) {
        return same;
    }
    PyObject *grad_dtype = PyObject_GetAttrString(grad, "dtype");
    if (grad_dtype == NULL) {
        return -1;
    }
    same = PyObject_RichCompareBool(grad_dtype, dtype, Py_EQ);
    Py_DECREF(grad_dtype);
    return same;
}

/* -- the walk ----------------------------------------------------------------- */

static int
edge_parent(PyObject *edge, PyObject **parent, PyObject **index)
{
    if (!PyTuple_CheckExact(edge)) {
        return 0;
    }
    if (PyTuple_GET_SIZE(edge) != 2) {
        PyErr_SetString(PyExc_ValueError, "backward: a record edge must be (record, index)");
        return -1;
    }
    *parent = PyTuple_GET_ITEM(edge, 0);
    *index = PyTuple_GET_ITEM(edge, 1);
    return 1;
}

/* For every record reachable from the buffered roots, count the edges that
   lead to it (the Python walk's _count_dependencies). Returns 1, before any
   backward has run, when the graph contains a node that is not a record, which
   the Python walk handles (or rejects with its own error). */
static int
count_dependencies(Walk *w)
{
    Py_ssize_t n_stack = 0;
    while (w->buffers.stack_capacity < w->count) {
        if (grow_array((void **)&w->buffers.stack, &w->buffers.stack_capacity,
                       sizeof(Py_ssize_t)) < 0) {
            return -1;
        }
    }
    for (Py_ssize_t k = 0; k < w->count; k++) {
        w->buffers.stack[n_stack++] = k;
    }
    int status = 0;
    while (n_stack > 0 && status == 0) {
        PyObject *node = w->buffers.states[w->buffers.stack[--n_stack]].node;
        PyObject *edges = gf_get(node, GF.c.edges);
        PyObject *seq = edges ? PySequence_Fast(edges, "record edges must be a list") : NULL;
        if (seq == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_AttributeError, "record has no edges");
            }
            status = -1;
            break;
        }
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            PyObject *parent, *index;
            int is_record = edge_parent(PySequence_Fast_GET_ITEM(seq, i), &parent, &index);
            if (is_record < 0) {
                status = -1;
                break;
            }
            if (!is_record) {
                continue;
            }
            if (!PyObject_TypeCheck(parent, GF.context_type)) {
                status = 1;
                break;
            }
            Py_ssize_t k = find_or_insert(w, parent);
            if (k < 0) {
                status = -1;
                break;
            }
            NodeState *st = &w->buffers.states[k];
            if (st->counted) {
                st->dependencies++;
                continue;
            }
            st->counted = 1;
            st->dependencies = 1;
            if (!st->buffered) {
                if (n_stack == w->buffers.stack_capacity
                        && grow_array((void **)&w->buffers.stack, &w->buffers.stack_capacity,
                                      sizeof(Py_ssize_t)) < 0) {
                    status = -1;
                    break;
                }
                w->buffers.stack[n_stack++] = k;
            }
        }
        Py_DECREF(seq);
    }
    return status;
}

/* Count an edge that carried no gradient as delivered (the Python walk's
   _skip_edge): a record left with no gradient at all never runs, but still
   reports to its own parents. */
static int
skip_edge(Walk *w, PyObject *first)
{
    PyObject *stack = PyList_New(0);
    if (stack == NULL || PyList_Append(stack, first) < 0) {
        Py_XDECREF(stack);
        return -1;
    }
    int status = 0;
    while (PyList_GET_SIZE(stack) > 0 && status == 0) {
        Py_ssize_t last = PyList_GET_SIZE(stack) - 1;
        PyObject *node = PyList_GET_ITEM(stack, last);
        Py_INCREF(node);
        PyList_SetSlice(stack, last, last + 1, NULL);
        Py_ssize_t k = find(w, node);
        if (k < 0 || !w->buffers.states[k].counted) {
            Py_DECREF(node);
            continue;
        }
        NodeState *st = &w->buffers.states[k];
        if (--st->dependencies) {
            Py_DECREF(node);
            continue;
        }
        if (st->buffered) {
            status = push_ready(w, k);
            Py_DECREF(node);
            continue;
        }
        PyObject *edges = gf_get(node, GF.c.edges);
        PyObject *seq = edges ? PySequence_Fast(edges, "record edges must be a list") : NULL;
        Py_DECREF(node);
        if (seq == NULL) {
            status = -1;
            break;
        }
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            PyObject *parent, *index;
            int is_record = edge_parent(PySequence_Fast_GET_ITEM(seq, i), &parent, &index);
            if (is_record < 0 || (is_record && PyList_Append(stack, parent) < 0)) {
                status = -1;
                break;
            }
        }
        Py_DECREF(seq);
    }
    Py_DECREF(stack);
    return status;
}

/* The gradients of a record's outputs as a list, zeros where none arrived. */
static PyObject *
output_grads(NodeState *st, PyObject *node)
{
    PyObject *slots = PyList_New(st->n_out);
    if (slots == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < st->n_out; i++) {
        PyObject **slot = st->n_out == 1 ? &st->slot0 : &st->slots[i];
        PyObject *grad = *slot ? *slot : Py_None;
        Py_INCREF(grad);
        PyList_SET_ITEM(slots, i, grad);
    }
    clear_slots(st);
    PyObject *grads = PyObject_CallFunctionObjArgs(
        GF.collect_output_grads, node, slots, Py_False, NULL);
    Py_DECREF(slots);
    if (grads != NULL && !PyList_Check(grads)) {
        Py_SETREF(grads, PySequence_List(grads));
    }
    return grads;
}

/* Run the Function's backward in Python; returns the gradient tuple. */
static PyObject *
python_backward(PyObject *node, PyObject *grads)
{
    PyObject *array_module = gf_get(node, GF.c.array_module);
    PyObject *xp;
    if (array_module == GF.numpy) {
        xp = GF.numpy_namespace;
        Py_INCREF(xp);
    }
    else {
        xp = PyObject_CallOneArg(GF.array_namespace, array_module ? array_module : Py_None);
        if (xp == NULL) {
            return NULL;
        }
    }
    gf_set_steal(node, GF.c.xp, xp);

    PyObject *function = gf_get(node, GF.c.function);
    PyObject *backward = function ? PyObject_GetAttr(function, gf_str_backward) : NULL;
    if (backward == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_AttributeError, "record has no function");
        }
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(grads);
    PyObject *small[8];
    PyObject **args = n + 1 <= 8 ? small : PyMem_Malloc((n + 1) * sizeof(PyObject *));
    if (args == NULL) {
        Py_DECREF(backward);
        return PyErr_NoMemory();
    }
    args[0] = node;
    for (Py_ssize_t i = 0; i < n; i++) {
        args[i + 1] = PyList_GET_ITEM(grads, i);
    }
    PyObject *out = PyObject_Vectorcall(backward, args, n + 1, NULL);
    if (args != small) {
        PyMem_Free(args);
    }
    Py_DECREF(backward);
    if (out == NULL) {
        return NULL;
    }
    if (!PyTuple_CheckExact(out)) {
        Py_SETREF(out, PyTuple_Pack(1, out));
    }
    return out;
}

static int
release(PyObject *node)
{
    if (PyList_GET_SIZE(GF.release_hooks) != 0) {
        PyObject *r = PyObject_CallMethodNoArgs(node, gf_str_release);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    gf_set(node, GF.c.saved, gf_empty_tuple);
    gf_set(node, GF.c.saved_kinds, Py_None);
    gf_set(node, GF.c.released, Py_True);
    return 0;
}

/* A record's edges or input metadata, held for the loop in deliver: an
   exact list or tuple itself, which the loop reads live as Python's zip
   does, and anything else copied into a tuple. */
static PyObject *
hold_sequence(PyObject *seq)
{
    if (seq == NULL) {
        return NULL;
    }
    if (PyList_CheckExact(seq) || PyTuple_CheckExact(seq)) {
        Py_INCREF(seq);
        return seq;
    }
    return PySequence_Tuple(seq);
}

/* Item `i` of a sequence from hold_sequence as a new reference, or NULL
   past its end. */
static PyObject *
held_item(PyObject *seq, Py_ssize_t i)
{
    PyObject *item = NULL;
    if (PyList_CheckExact(seq)) {
        item = i < PyList_GET_SIZE(seq) ? PyList_GET_ITEM(seq, i) : NULL;
    }
    else {
        item = i < PyTuple_GET_SIZE(seq) ? PyTuple_GET_ITEM(seq, i) : NULL;
    }
    Py_XINCREF(item);
    return item;
}

/* The Python walk's _fit_to_input for its common case: a floating-point
   NumPy gradient of the input's dtype, broadcast along some axes. It sums
   as that function does (grad.sum over the same axes, keepdims, then a
   reshape), so the results are bitwise equal. Sets *handled to 0, and
   returns NULL without an error, for every other case, which
   _fit_to_input handles or rejects with its own message. */
static PyObject *
sum_to_shape(PyObject *grad, PyObject *meta, int *handled)
{
    static PyObject *sum_name, *sum_kwnames;
    *handled = 0;
    if (!PyArray_CheckExact(grad) || !PyTuple_CheckExact(meta) || PyTuple_GET_SIZE(meta) != 2) {
        return NULL;
    }
    PyArrayObject *array = (PyArrayObject *)grad;
    PyObject *shape = PyTuple_GET_ITEM(meta, 0), *dtype = PyTuple_GET_ITEM(meta, 1);
    /* A sum comes back in native byte order, so only a native dtype is
       sure to come back unchanged (_fit_to_input casts the others back). */
    if (!(PyArray_ISFLOAT(array) || PyArray_ISCOMPLEX(array)) || !PyArray_ISNOTSWAPPED(array)
            || !PyTuple_CheckExact(shape) || (PyObject *)PyArray_DESCR(array) != dtype) {
        return NULL;
    }
    int ndim = PyArray_NDIM(array);
    Py_ssize_t n = PyTuple_GET_SIZE(shape), extra = ndim - n;
    if (extra < 0 || n > NPY_MAXDIMS) {
        return NULL;
    }
    npy_intp dims[NPY_MAXDIMS];
    PyObject *axes = PyTuple_New(ndim);
    if (axes == NULL) {
        return NULL;
    }
    Py_ssize_t n_axes = 0;
    for (Py_ssize_t i = 0; i < ndim; i++) {
        npy_intp size = PyArray_DIMS(array)[i];
        int reduce = i < extra;
        if (!reduce) {
            Py_ssize_t expected = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, i - extra));
            if (expected == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                Py_DECREF(axes);
                return NULL;
            }
            if (expected != size && expected != 1) {
                Py_DECREF(axes);
                return NULL;  /* does not broadcast: _fit_to_input raises */
            }
            reduce = expected == 1 && size != 1;
            dims[i - extra] = expected;
        }
        if (reduce) {
            PyObject *axis = PyLong_FromSsize_t(i);
            if (axis == NULL) {
                Py_DECREF(axes);
                *handled = 1;
                return NULL;
            }
            PyTuple_SET_ITEM(axes, n_axes++, axis);
        }
    }
    if (n_axes == 0) {
        /* Same shape and dtype, which deliver_one has matched already. */
        Py_DECREF(axes);
        return NULL;
    }
    *handled = 1;
    if (_PyTuple_Resize(&axes, n_axes) < 0) {
        return NULL;
    }
    if (sum_name == NULL) {
        sum_name = PyUnicode_InternFromString("sum");
        sum_kwnames = Py_BuildValue("(ss)", "axis", "keepdims");
        if (sum_name == NULL || sum_kwnames == NULL) {
            Py_CLEAR(sum_name);
            Py_CLEAR(sum_kwnames);
            Py_DECREF(axes);
            return NULL;
        }
    }
    /* grad.sum(axis=axes, keepdims=True), the Python walk's own call, so
       that a warning (a float16 overflow) comes from the same place. */
    PyObject *call[] = {grad, axes, Py_True};
    PyObject *sum = PyObject_VectorcallMethod(
        sum_name, call, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, sum_kwnames);
    Py_DECREF(axes);
    if (sum == NULL) {
        return NULL;
    }
    if (!PyArray_Check(sum) || (PyObject *)PyArray_DESCR((PyArrayObject *)sum) != dtype) {
        /* Not the input's dtype after all: _fit_to_input starts over. */
        Py_DECREF(sum);
        *handled = 0;
        return NULL;
    }
    if (extra == 0) {
        return sum;
    }
    PyArray_Dims newshape = {dims, (int)n};
    PyObject *reshaped = PyArray_Newshape((PyArrayObject *)sum, &newshape, NPY_CORDER);
    Py_DECREF(sum);
    return reshaped;
}

/* Pass one input gradient along `edge`; `grad` is borrowed. */
static int
deliver_one(Walk *w, PyObject *node, PyObject *edge, PyObject *meta, PyObject *grad)
{
    PyObject *parent, *index;
    int is_record = edge_parent(edge, &parent, &index);
    if (is_record < 0) {
        return -1;
    }
    if (grad == NULL || grad == Py_None) {
        return is_record ? skip_edge(w, parent) : 0;
    }
    int fits = matches_meta(grad, meta);
    if (fits < 0) {
        return -1;
    }
    if (fits) {
        Py_INCREF(grad);
    }
    else {
        int handled;
        PyObject *fitted = sum_to_shape(grad, meta, &handled);
        if (!handled) {
            fitted = PyObject_CallFunctionObjArgs(GF.fit_to_input, node, grad, meta, NULL);
        }
        if (fitted == NULL) {
            return -1;
        }
        grad = fitted;
    }
    int status = 0;
    if (is_record) {
        Py_ssize_t k = add_to_buffer(w, parent, index, grad);
        if (k < 0) {
            status = -1;
        }
        else if (!w->buffers.states[k].counted) {
            PyErr_SetObject(PyExc_KeyError, parent);
            status = -1;
        }
        else if (--w->buffers.states[k].dependencies == 0) {
            status = push_ready(w, k);
        }
    }
    else {
        PyObject *pair = PyTuple_Pack(2, edge, grad);
        if (pair == NULL || PyList_Append(w->leaf_grads, pair) < 0) {
            status = -1;
        }
        Py_XDECREF(pair);
    }
    Py_DECREF(grad);
    return status;
}

/* Pass each input gradient along its edge. `grad_inputs` holds new
   references (NULL for None), which this consumes. */
static int
deliver(Walk *w, PyObject *node, PyObject **grad_inputs, Py_ssize_t n_grads)
{
    /* Held, because Python code that runs below (a gradient's own shape,
       _fit_to_input, _sum_grads) could rebind the record's lists. */
    PyObject *edges = hold_sequence(gf_get(node, GF.c.edges));
    PyObject *metas = hold_sequence(gf_get(node, GF.c.input_meta));
    int status = 0;
    if (edges == NULL || metas == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_AttributeError, "record has no edges or input_meta");
        }
        status = -1;
    }
    for (Py_ssize_t i = 0; i < n_grads && status == 0; i++) {
        PyObject *edge = held_item(edges, i);
        PyObject *meta = held_item(metas, i);
        if (edge == NULL || meta == NULL) {
            Py_XDECREF(edge);
            Py_XDECREF(meta);
            break;
        }
        if (edge != Py_None) {
            status = deliver_one(w, node, edge, meta, grad_inputs[i]);
        }
        Py_DECREF(edge);
        Py_DECREF(meta);
    }
    for (Py_ssize_t i = 0; i < n_grads; i++) {
        Py_CLEAR(grad_inputs[i]);
    }
    Py_XDECREF(edges);
    Py_XDECREF(metas);
    return status;
}

static int
has_hooks(PyObject *node)
{
    PyObject *hooks = gf_get(node, GF.c.hooks);
    PyObject *retained = gf_get(node, GF.c.retained);
    int any = !gf_is_none(hooks) ? PyObject_IsTrue(hooks) : 0;
    if (any != 0) {
        return any;
    }
    return !gf_is_none(retained) ? PyObject_IsTrue(retained) : 0;
}

/* Move the one output gradient `*grad` into a new list `*grads`, the form
   the Python helpers take, unless the gradients are a list already. */
static int
as_list(PyObject **grads, PyObject **grad)
{
    if (*grads != NULL) {
        return 0;
    }
    *grads = PyList_New(1);
    if (*grads == NULL) {
        return -1;
    }
    PyList_SET_ITEM(*grads, 0, *grad);
    *grad = NULL;
    return 0;
}

static int
run_node(Walk *w, Py_ssize_t k)
{
    NodeState *st = &w->buffers.states[k];
    PyObject *node = st->node;
    PyObject *grads = NULL;      /* list of output gradients, when needed */
    PyObject *grad = NULL;       /* the one output gradient, otherwise */
    PyObject *grad_inputs[2] = {NULL, NULL};
    PyObject *result = NULL;
    int status = -1;

    st->buffered = 0;
    if (st->n_out == 1 && st->slot0 != NULL) {
        grad = st->slot0;
        st->slot0 = NULL;
    }
    else {
        grads = output_grads(st, node);
        if (grads == NULL) {
            return -1;
        }
    }

    int hooked = has_hooks(node);
    if (hooked < 0) {
        goto done;
    }
    if (hooked) {
        if (as_list(&grads, &grad) < 0) {
            goto done;
        }
        PyObject *r = PyObject_CallFunctionObjArgs(
            GF.run_output_hooks, node, grads, Py_None, Py_None, NULL);
        if (r == NULL) {
            goto done;
        }
        Py_DECREF(r);
    }

    int handled = 0;
    PyObject *op = gf_get(node, GF.c.op);
    PyObject *edges = gf_get(node, GF.c.edges);
    Py_ssize_t n_edges = edges != NULL ? PyObject_Length(edges) : -1;
    if (n_edges < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_AttributeError, "record has no edges");
        }
        goto done;
    }
    if (op != NULL && PyLong_CheckExact(op) && n_edges <= 2
            && (grad != NULL || PyList_GET_SIZE(grads) == 1)) {
        PyObject *g = grad != NULL ? grad : PyList_GET_ITEM(grads, 0);
        handled = gf_op_backward(node, op, g, grad_inputs, n_edges);
    }
    if (!handled) {
        if (as_list(&grads, &grad) < 0) {
            goto done;
        }
        result = python_backward(node, grads);
        if (result == NULL) {
            goto done;
        }
        edges = gf_get(node, GF.c.edges);
        n_edges = edges != NULL ? PyObject_Length(edges) : -1;
        if (n_edges < 0) {
            goto done;
        }
        if (PyTuple_GET_SIZE(result) != n_edges) {
            PyObject *r = PyObject_CallFunctionObjArgs(
                GF.raise_gradient_count, node, result, NULL);
            Py_XDECREF(r);
            if (r != NULL) {
                PyErr_SetString(PyExc_RuntimeError, "backward returned a wrong gradient count");
            }
            goto done;
        }
    }
    /* The output gradients are no longer needed: drop them before the
       input gradients travel on, as the Python walk does. */
    Py_CLEAR(grad);
    Py_CLEAR(grads);

    if (!w->retain_graph && release(node) < 0) {
        goto done;
    }
    if (handled) {
        status = deliver(w, node, grad_inputs, n_edges);
    }
    else {
        Py_ssize_t n = PyTuple_GET_SIZE(result);
        PyObject **items = PyMem_Malloc(Py_MAX(n, 1) * sizeof(PyObject *));
        if (items == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            items[i] = PyTuple_GET_ITEM(result, i);
            Py_INCREF(items[i]);
        }
        Py_CLEAR(result);
        status = deliver(w, node, items, n);
        PyMem_Free(items);
    }

done:
    Py_XDECREF(grad);
    Py_XDECREF(grads);
    Py_XDECREF(result);
    Py_XDECREF(grad_inputs[0]);
    Py_XDECREF(grad_inputs[1]);
    return status;
}

/* Returns 0 when done, -1 on error, and 1, before any backward ran, when
   the Python walk must run instead. */
static int
walk(Walk *w, PyObject *roots, PyObject *root_grads)
{
    Py_ssize_t n = Py_MIN(PyList_GET_SIZE(roots), PyList_GET_SIZE(root_grads));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *root = PyList_GET_ITEM(roots, i);
        PyObject *grad = PyList_GET_ITEM(root_grads, i);
        PyObject *grad_fn = gf_get(root, GF.t.grad_fn);
        if (!gf_is_none(grad_fn) && !PyObject_TypeCheck(grad_fn, GF.context_type)) {
            return 1;  /* not a record: the Python walk handles it */
        }
        if (gf_is_none(grad_fn)) {
            PyObject *pair = PyTuple_Pack(2, root, grad);
            int failed = pair == NULL || PyList_Append(w->leaf_grads, pair) < 0;
            Py_XDECREF(pair);
            if (failed) {
                return -1;
            }
        }
        else if (add_to_buffer(w, grad_fn, gf_get(root, GF.t.out_index), grad) < 0) {
            return -1;
        }
    }
    int counted = count_dependencies(w);
    if (counted != 0) {
        return counted;
    }
    for (Py_ssize_t k = 0; k < w->count; k++) {
        NodeState *st = &w->buffers.states[k];
        if (st->buffered && (!st->counted || st->dependencies == 0)) {
            if (push_ready(w, k) < 0) {
                return -1;
            }
        }
    }
    while (w->n_ready > 0) {
        if (run_node(w, w->buffers.ready[--w->n_ready]) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Whether the Python walk's _store_leaf_grads would store `grad` into
   `leaf` as a new gradient with no further checks: a plain Tensor with no
   hooks, no gradient yet and no gradient buffer, and a NumPy gradient of
   its shape and dtype. A slot that is not set does not count as None,
   because Python raises there. */
static int
is_plain_leaf_grad(PyObject *pair)
{
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
        return 0;
    }
    PyObject *leaf = PyTuple_GET_ITEM(pair, 0), *grad = PyTuple_GET_ITEM(pair, 1);
    if (!Py_IS_TYPE(leaf, GF.tensor_type) || gf_get(leaf, GF.t.hooks) != Py_None
            || gf_get(leaf, GF.t.grad) != Py_None || gf_get(leaf, GF.t.grad_buffer) != Py_None) {
        return 0;
    }
    PyObject *data = gf_get(leaf, GF.t.data);
    if (data == NULL || !PyArray_CheckExact(data) || !PyArray_CheckExact(grad)) {
        return 0;
    }
    PyArrayObject *a = (PyArrayObject *)data, *g = (PyArrayObject *)grad;
    return PyArray_NDIM(a) == PyArray_NDIM(g)
        && PyArray_CompareLists(PyArray_DIMS(a), PyArray_DIMS(g), PyArray_NDIM(a))
        && (PyArray_DESCR(a) == PyArray_DESCR(g)
            || PyArray_EquivTypes(PyArray_DESCR(a), PyArray_DESCR(g)));
}

/* The Python walk's _store_leaf_grads, with its common case in C: each
   leaf appears once, and each pair in turn passes is_plain_leaf_grad just
   before its gradient is stored. The gradient array becomes the leaf's
   .grad as it is when nothing else refers to it, and a C-order copy
   otherwise, as there. From the first pair that does not pass, the rest
   go to _store_leaf_grads, which also takes every list with a repeated
   leaf. Returns None or NULL on error. */
static PyObject *
store_leaf_grads(PyObject *leaf_grads)
{
    Py_ssize_t n = PyList_GET_SIZE(leaf_grads);
    int repeated = n > 16;  /* the check below is quadratic */
    for (Py_ssize_t i = 1; i < n && !repeated; i++) {
        PyObject *pair = PyList_GET_ITEM(leaf_grads, i);
        for (Py_ssize_t j = 0; j < i && !repeated; j++) {
            PyObject *earlier = PyList_GET_ITEM(leaf_grads, j);
            repeated = !PyTuple_CheckExact(pair) || !PyTuple_CheckExact(earlier)
                || PyTuple_GET_SIZE(pair) != 2 || PyTuple_GET_SIZE(earlier) != 2
                || PyTuple_GET_ITEM(pair, 0) == PyTuple_GET_ITEM(earlier, 0);
        }
    }
    /* Python code that runs below (a finalizer) may change the list, so
       its length is read again on every pass. */
    Py_ssize_t i = 0;
    for (; !repeated && i < PyList_GET_SIZE(leaf_grads)
            && is_plain_leaf_grad(PyList_GET_ITEM(leaf_grads, i)); i++) {
        /* Taken out of the list, so that an array that this pair alone
           refers to counts as the leaf's own, as in the Python walk, which
           drops each pair before the next. */
        PyObject *pair = PyList_GET_ITEM(leaf_grads, i);
        PyList_SET_ITEM(leaf_grads, i, Py_NewRef(Py_None));
        PyObject *leaf = PyTuple_GET_ITEM(pair, 0), *grad = PyTuple_GET_ITEM(pair, 1);
        PyArrayObject *g = (PyArrayObject *)grad;
        /* An array the walk made for this leaf alone (_unshared there). */
        int own = Py_REFCNT(pair) == 1 && Py_REFCNT(grad) == 1 && PyArray_BASE(g) == NULL
            && PyArray_ISWRITEABLE(g);
        PyObject *array = own ? Py_NewRef(grad) : PyArray_NewCopy(g, NPY_CORDER);
        PyObject *tensor = array != NULL ? gf_new_tensor(array, Py_None, 0) : NULL;
        Py_XDECREF(array);
        if (tensor != NULL) {
            gf_set_steal(leaf, GF.t.grad, tensor);
        }
        /* Dropping the pair may run Python code (a finalizer of the leaf),
           and the check of the next pair detects what it changed. */
        Py_DECREF(pair);
        if (tensor == NULL) {
            return NULL;
        }
    }
    n = PyList_GET_SIZE(leaf_grads);
    if (i >= n) {
        Py_RETURN_NONE;
    }
    PyObject *rest = PyList_GetSlice(leaf_grads, i, n);
    if (rest == NULL) {
        return NULL;
    }
    /* The slice now owns the pairs, in place of leaf_grads. */
    if (PyList_SetSlice(leaf_grads, i, n, NULL) < 0) {
        Py_DECREF(rest);
        return NULL;
    }
    PyObject *r = PyObject_CallFunctionObjArgs(GF.store_leaf_grads, rest, Py_False, NULL);
    Py_DECREF(rest);
    return r;
}

PyObject *
gf_run_backward(PyObject *self, PyObject *args)
{
    PyObject *roots, *root_grads;
    int retain_graph;
    if (!PyArg_ParseTuple(args, "O!O!p:run_backward", &PyList_Type, &roots,
                          &PyList_Type, &root_grads, &retain_graph)) {
        return NULL;
    }
    if (!GF.bound) {
        PyErr_SetString(PyExc_RuntimeError, "gradflow._C is not bound yet");
        return NULL;
    }
    Walk w = {0};
    w.retain_graph = retain_graph;
    w.leaf_grads = PyList_New(0);
    if (w.leaf_grads == NULL || take_buffers(&w) < 0) {
        walk_free(&w);
        return NULL;
    }

    int was_enabled = gf_grad_enabled();
    gf_set_grad_enabled(0);
    int status = walk(&w, roots, root_grads);
    gf_set_grad_enabled(was_enabled);

    /* The walk's gradient buffers go before the leaf gradients are stored,
       since a gradient array that nothing else refers to is stored
       uncopied. Its records stay until after the store, as in the Python
       walk, so that the leaves they refer to stay alive until then too. */
    for (Py_ssize_t k = 0; k < w.count; k++) {
        clear_slots(&w.buffers.states[k]);
    }
    PyObject *leaf_grads = w.leaf_grads;
    w.leaf_grads = NULL;
    PyObject *r = status == 0 ? store_leaf_grads(leaf_grads) : NULL;
    Py_DECREF(leaf_grads);
    walk_free(&w);
    if (status > 0) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    return r;
}
