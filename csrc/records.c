/* Keeping fast-op records out of Python's cyclic garbage collector.
 *
 * A graph of tiny ops keeps several container objects per op: the record,
 * its edge list and edge tuples, its saved tuple. The collector's full
 * passes visit every one of them, and in a graph of 300,000 ops those
 * passes took 2.4 s of a 2.8 s forward pass. Records made here therefore
 * start untracked, which is safe as long as no reference cycle passes
 * through them: an untracked object on a cycle keeps the cycle alive, so it
 * would leak, though nothing is ever freed early.
 *
 * The graph itself has no cycles, because records refer only to what was
 * computed before them. A cycle needs a reference from an earlier object
 * to a later one. gradflow makes those possible in four places: a hook
 * (whose closure may hold any object), a .grad that carries a graph, is a
 * view of a tensor that may carry one or can be given attributes, a
 * backward with create_graph=True (which stores such gradients), and a
 * record that keeps an object that can reach other tensors (a custom
 * Function's ctx attribute, a checkpoint's function, a value packed by
 * saved_tensors_hooks, a Function class that is not gradflow's own, a
 * Tensor subclass instance that can be given attributes). Each of these
 * calls gf_track_records first, which tracks every live untracked record
 * and makes every later record tracked, for the rest of the process. Live
 * untracked records are found through a doubly linked list that runs
 * through their C base (gf_record_base). A record leaves it when it is
 * freed.
 *
 * An attribute set on a record after it was made (t.grad_fn.x = y) is
 * checked as well, in gf_record_setattro.
 *
 * NOTE: an array that takes attributes (a Python subclass of ndarray)
 * assigned to a leaf's .data after a record refers to the leaf, and what
 * user code writes into a record's __dict__ directly, are not checked. A
 * cycle through either leaks. A check on .data would need a descriptor of
 * its own, and every read of .data in Python code would then lose the
 * interpreter's fast slot access.
 */
#include "gradflow.h"

/* The list of untracked records: a ring through this sentinel, of which
   only the links are used. */
static gf_record_base untracked = {
    .prev_untracked = &untracked, .next_untracked = &untracked,
};

static void
link_untracked(gf_record_base *record)
{
    record->prev_untracked = untracked.prev_untracked;
    record->next_untracked = &untracked;
    untracked.prev_untracked->next_untracked = record;
    untracked.prev_untracked = record;
}

static void
unlink_untracked(gf_record_base *record)
{
    if (record->next_untracked != NULL) {
        record->prev_untracked->next_untracked = record->next_untracked;
        record->next_untracked->prev_untracked = record->prev_untracked;
        record->prev_untracked = record->next_untracked = NULL;
    }
}

void
gf_record_base_dealloc(PyObject *record)
{
    unlink_untracked((gf_record_base *)record);
    Py_TYPE(record)->tp_free(record);
}

static void
track(PyObject *obj)
{
    if (obj != NULL && PyObject_IS_GC(obj) && !PyObject_GC_IsTracked(obj)) {
        PyObject_GC_Track(obj);
    }
}

static void
untrack(PyObject *obj)
{
    if (obj != NULL && PyObject_IS_GC(obj) && PyObject_GC_IsTracked(obj)) {
        PyObject_GC_UnTrack(obj);
    }
}

/* Apply `fn` to a record and to the containers only it refers to. */
static void
for_record_containers(PyObject *ctx, void (*fn)(PyObject *))
{
    PyObject *edges = gf_get(ctx, GF.c.edges);
    if (edges != NULL && (PyList_CheckExact(edges) || PyTuple_CheckExact(edges))) {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(edges); i++) {
            PyObject *edge = PySequence_Fast_GET_ITEM(edges, i);
            if (PyTuple_CheckExact(edge)) {
                fn(edge);
            }
        }
        fn(edges);
    }
    PyObject *saved = gf_get(ctx, GF.c.saved);
    if (saved != NULL && PyTuple_CheckExact(saved)) {
        int holds_containers = 0;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(saved); i++) {
            holds_containers |= PyObject_IS_GC(PyTuple_GET_ITEM(saved, i));
        }
        if (holds_containers || fn == untrack) {
            fn(saved);
        }
    }
    fn(ctx);
}

/* Whether `obj` is a Tensor that can be given attributes after a record
   refers to it: an instance of a subclass with a __dict__ or slots of its
   own. Such a leaf can later refer to a result computed from it. */
static int
tensor_takes_attributes(PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    return type != GF.tensor_type && gf_is_tensor(obj)
        && (type->tp_dictoffset != 0 || type->tp_basicsize != GF.tensor_type->tp_basicsize);
}

/* Whether a record refers to such a Tensor: a leaf input (its edge) or a
   saved input. */
static int
refers_to_open_tensor(PyObject *ctx)
{
    PyObject *edges = gf_get(ctx, GF.c.edges);
    if (edges != NULL && (PyList_CheckExact(edges) || PyTuple_CheckExact(edges))) {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(edges); i++) {
            if (tensor_takes_attributes(PySequence_Fast_GET_ITEM(edges, i))) {
                return 1;
            }
        }
    }
    PyObject *saved = gf_get(ctx, GF.c.saved);
    if (saved != NULL && PyTuple_CheckExact(saved)) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(saved); i++) {
            if (tensor_takes_attributes(PyTuple_GET_ITEM(saved, i))) {
                return 1;
            }
        }
    }
    return 0;
}

/* Take a new record out of the collector's view, unless records are
   tracked by now. */
int
gf_untrack_record(PyObject *ctx)
{
    if (GF.track_records) {
        return 0;
    }
    if (refers_to_open_tensor(ctx)) {
        PyObject *r = gf_track_records(NULL, NULL);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    if (!PyObject_TypeCheck(ctx, &GF_RecordBaseType)) {
        return 0;  /* not on the list, so it stays tracked */
    }
    link_untracked((gf_record_base *)ctx);
    for_record_containers(ctx, untrack);
    return 0;
}

PyObject *
gf_track_records(PyObject *self, PyObject *unused)
{
    GF.track_records = 1;
    while (untracked.next_untracked != &untracked) {
        gf_record_base *record = untracked.next_untracked;
        unlink_untracked(record);
        for_record_containers((PyObject *)record, track);
    }
    Py_RETURN_NONE;
}

/* Whether `value` may refer to a tensor or record, now or later, so that it
   could close a cycle. Values that refer to no container (numbers, strings,
   arrays, dtypes) cannot, and neither can static or immutable types and
   gradflow's own classes. Tuples, frozensets, slices and instances of the
   bookkeeping classes that gradflow.bind() names (devices, window geometry)
   cannot when nothing they refer to can. Their referents are inspected
   through the collector's own tp_traverse, up to `budget` objects. Any other
   object can, because a list or dict may be filled later, and a function, a
   module or a user's class may reach anything. */
typedef struct {
    int depth;
    int budget;
} Search;

static int may_refer_to_graph(PyObject *value, Search *search);

/* gradflow's module-level classes found so far: id(class) -> a weak
   reference to the class, whose callback removes the entry, so that the
   cache keeps no class alive. */
static PyObject *module_level_classes;

static PyObject *
forget_class(PyObject *key, PyObject *ref)
{
    if (module_level_classes != NULL) {
        PyObject *entry = PyDict_GetItemWithError(module_level_classes, key);
        if (entry == ref && PyDict_DelItem(module_level_classes, key) < 0) {
            return NULL;
        }
        if (entry == NULL && PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

static PyMethodDef forget_class_def = {"forget_class", forget_class, METH_O, NULL};

/* Whether `cls` is one of gradflow's own module-level classes: what the
   attribute path __qualname__ names in a gradflow module. Those stay
   reachable from sys.modules, so a reference to one never keeps a garbage
   cycle alive. Any other class may: one made inside a function can close
   over any object, and one of the user's modules can be deleted from it,
   or reloaded, and then be given attributes. */
static int
class_is_gradflows(PyObject *cls)
{
    if (module_level_classes == NULL) {
        module_level_classes = PyDict_New();
        if (module_level_classes == NULL) {
            return -1;
        }
    }
    PyObject *key = PyLong_FromVoidPtr(cls);
    if (key == NULL) {
        return -1;
    }
    PyObject *entry = PyDict_GetItemWithError(module_level_classes, key);
    if (entry != NULL && PyWeakref_GET_OBJECT(entry) == cls) {
        Py_DECREF(key);
        return 1;
    }
    if (entry == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    PyObject *module_name = PyObject_GetAttrString(cls, "__module__");
    PyObject *qualname = PyObject_GetAttrString(cls, "__qualname__");
    PyObject *parts = NULL, *found = NULL;
    if (module_name == NULL || qualname == NULL || !PyUnicode_Check(module_name)
            || !PyUnicode_Check(qualname)) {
        goto done;
    }
    if (PyUnicode_CompareWithASCIIString(module_name, "gradflow") != 0
            && PyUnicode_Tailmatch(module_name, gf_str_gradflow_prefix, 0, PY_SSIZE_T_MAX, -1) != 1) {
        goto done;
    }
    found = PyImport_GetModule(module_name);
    parts = PyUnicode_Split(qualname, gf_str_dot, -1);
    for (Py_ssize_t i = 0; found != NULL && parts != NULL && i < PyList_GET_SIZE(parts); i++) {
        Py_SETREF(found, PyObject_GetAttr(found, PyList_GET_ITEM(parts, i)));
    }
done:
    PyErr_Clear();
    int status = found == cls;
    if (status) {
        PyObject *callback = PyCFunction_New(&forget_class_def, key);
        PyObject *ref = callback != NULL ? PyWeakref_NewRef(cls, callback) : NULL;
        if (ref == NULL || PyDict_SetItem(module_level_classes, key, ref) < 0) {
            status = -1;
        }
        Py_XDECREF(callback);
        Py_XDECREF(ref);
    }
    Py_DECREF(key);
    Py_XDECREF(module_name);
    Py_XDECREF(qualname);
    Py_XDECREF(parts);
    Py_XDECREF(found);
    return status;
}

static int
visit_referent(PyObject *value, void *arg)
{
    return may_refer_to_graph(value, (Search *)arg);
}

static int
may_refer_to_graph(PyObject *value, Search *search)
{
    if (value == NULL || !PyObject_IS_GC(value)) {
        return 0;
    }
    if (PyType_Check(value)) {
        /* A static or immutable type (float, NumPy's scalar types) takes no
           attributes and closes over nothing. */
        unsigned long flags = ((PyTypeObject *)value)->tp_flags;
        if (!(flags & Py_TPFLAGS_HEAPTYPE) || (flags & Py_TPFLAGS_IMMUTABLETYPE)) {
            return 0;
        }
        int ours = class_is_gradflows(value);
        if (ours < 0) {
            PyErr_Clear();
        }
        return ours != 1;
    }
    /* Exact tuples and frozensets count as immutable, and so do subclasses
       that add no attributes (a namedtuple). A subclass with a __dict__ or
       slots does not, because it can be given a later tensor after this
       check. */
    PyTypeObject *type = Py_TYPE(value);
    int immutable = PyTuple_CheckExact(value) || PyFrozenSet_CheckExact(value)
        || PySlice_Check(value);
    if (!immutable && (PyTuple_Check(value) || PyFrozenSet_Check(value))) {
        PyTypeObject *base = PyTuple_Check(value) ? &PyTuple_Type : &PyFrozenSet_Type;
        immutable = type->tp_dictoffset == 0 && type->tp_basicsize == base->tp_basicsize;
    }
    for (Py_ssize_t i = 0; !immutable && i < PyTuple_GET_SIZE(GF.inert_types); i++) {
        immutable = Py_IS_TYPE(value, (PyTypeObject *)PyTuple_GET_ITEM(GF.inert_types, i));
    }
    if (!immutable || search->depth >= 4 || --search->budget < 0) {
        return 1;
    }
    traverseproc traverse = Py_TYPE(value)->tp_traverse;
    if (traverse == NULL) {
        return 1;
    }
    search->depth++;
    int found = traverse(value, visit_referent, search);
    search->depth--;
    return found != 0;
}

int
gf_note_record(PyObject *ctx)
{
    if (GF.track_records) {
        return 0;
    }
    Search search = {0, 64};
    /* The record refers to its Function class, which may be the user's. */
    int found = refers_to_open_tensor(ctx)
        || may_refer_to_graph(gf_get(ctx, GF.c.function), &search);
    PyObject **dict = _PyObject_GetDictPtr(ctx);
    if (dict != NULL && *dict != NULL) {
        PyObject *key, *value;
        Py_ssize_t position = 0;
        while (!found && PyDict_Next(*dict, &position, &key, &value)) {
            search.depth = 0;
            found = may_refer_to_graph(value, &search);
        }
    }
    PyObject *saved = gf_get(ctx, GF.c.saved);
    PyObject *kinds = gf_get(ctx, GF.c.saved_kinds);
    if (!found && saved != NULL && PyTuple_CheckExact(saved)) {
        /* Inputs are earlier tensors, and outputs this record's own arrays. */
        for (Py_ssize_t i = 0; !found && i < PyTuple_GET_SIZE(saved); i++) {
            PyObject *kind = kinds != NULL && PyTuple_CheckExact(kinds)
                && i < PyTuple_GET_SIZE(kinds) ? PyTuple_GET_ITEM(kinds, i) : Py_None;
            /* A packed input (saved_tensors_hooks) is kept as the hooks'
               own object, which may refer to anything. */
            if (kind == gf_str_input && gf_is_tensor(PyTuple_GET_ITEM(saved, i))) {
                continue;
            }
            search.depth = 0;
            found = may_refer_to_graph(PyTuple_GET_ITEM(saved, i), &search);
        }
    }
    if (found) {
        PyObject *r = gf_track_records(NULL, NULL);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    return 0;
}

PyObject *
gf_py_note_record(PyObject *self, PyObject *ctx)
{
    if (!GF.bound) {
        Py_RETURN_NONE;  /* no fast-op record exists yet */
    }
    if (!PyObject_TypeCheck(ctx, GF.context_type)) {
        PyErr_Format(PyExc_TypeError, "note_record expects a Context, got %s",
                     Py_TYPE(ctx)->tp_name);
        return NULL;
    }
    if (gf_note_record(ctx) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *
gf_records_tracked(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(GF.track_records);
}

/* -- later changes ------------------------------------------------------------ */

/* Whether `name` on a record is one of its __slots__, which only gradflow
   writes. Any other name goes into the record's __dict__, replaces the
   __dict__ or __class__, or reaches a property of a subclass. */
static int
names_slot(PyObject *record, PyObject *name)
{
    PyObject *descr = _PyType_Lookup(Py_TYPE(record), name);
    return descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type);
}

int
gf_record_setattro(PyObject *record, PyObject *name, PyObject *value)
{
    /* A new attribute that may refer to a later tensor could close a cycle
       through this record or through untracked records made after it. */
    if (value != NULL && GF.bound && !GF.track_records && PyObject_IS_GC(value)
            && PyUnicode_Check(name) && !names_slot(record, name)) {
        Search search = {0, 64};
        if (may_refer_to_graph(value, &search)) {
            PyObject *r = gf_track_records(NULL, NULL);
            if (r == NULL) {
                return -1;
            }
            Py_DECREF(r);
        }
    }
    return PyObject_GenericSetAttr(record, name, value);
}
