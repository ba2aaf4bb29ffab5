/* A cache of the arenas that Python's small-object allocator frees.
 *
 * Records, tensors, edge tuples and most of a graph's other objects live in
 * the arenas of Python's small-object allocator (1 MiB each). When a
 * backward has run and the graph goes, its arenas empty, and Python hands
 * every empty arena but one back to the system. The next training step
 * builds a graph of the same size in new arenas, and each of their pages
 * costs a page fault and zero filling. A graph of 10^5 small ops faulted in
 * about 180 MB this way on every step, about a fifth of the step's time.
 *
 * The cache keeps freed arenas, up to a limit, and hands them out again.
 * Each cached arena is marked MADV_FREE where the system has it, so that the
 * system may still take its pages back under memory pressure. Until it
 * does, using the arena again costs no fault. gradflow installs the cache
 * once, at import (gradflow/_fastpath.py), for the life of the process.
 */
#include "gradflow.h"

#include <sys/mman.h>

/* Python also takes smaller blocks through the arena allocator (16 KiB
   chunks of the frame stack), so only blocks at least this large count as
   arenas. */
#define MIN_ARENA_BYTES ((size_t)256 << 10)

static PyObjectArenaAllocator base;
static void **cached_arenas;
static size_t n_cached, limit_bytes;
static size_t arena_bytes;   /* size of Python's arenas, 0 until one is freed */

static void *
arena_alloc(void *ctx, size_t size)
{
    if (n_cached > 0 && size == arena_bytes) {
        return cached_arenas[--n_cached];
    }
    return base.alloc(base.ctx, size);
}

static void
arena_free(void *ctx, void *ptr, size_t size)
{
    if (arena_bytes == 0 && size >= MIN_ARENA_BYTES) {
        arena_bytes = size;
    }
    if (size == arena_bytes && (n_cached + 1) * arena_bytes <= limit_bytes) {
#ifdef MADV_FREE
        madvise(ptr, size, MADV_FREE);
#endif
        cached_arenas[n_cached++] = ptr;
        return;
    }
    base.free(base.ctx, ptr, size);
}

PyObject *
gf_cache_arenas(PyObject *self, PyObject *arg)
{
    Py_ssize_t limit_mb = PyLong_AsSsize_t(arg);
    if (limit_mb == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit_mb < 0) {
        PyErr_Format(PyExc_ValueError,
                     "cache_arenas: the limit must be 0 or more MiB, got %zd", limit_mb);
        return NULL;
    }
    if (cached_arenas != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cache_arenas: the arena cache is already installed (once per process, at import)");
        return NULL;
    }
    if (limit_mb == 0) {
        Py_RETURN_NONE;
    }
    limit_bytes = (size_t)limit_mb << 20;
    /* Room for as many arenas as the limit allows if all had the least size. */
    cached_arenas = PyMem_RawMalloc(limit_bytes / MIN_ARENA_BYTES * sizeof(void *));
    if (cached_arenas == NULL) {
        return PyErr_NoMemory();
    }
    PyObject_GetArenaAllocator(&base);
    PyObjectArenaAllocator cache = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&cache);
    Py_RETURN_NONE;
}

PyObject *
gf_arena_cache_info(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("{s:O,s:n,s:n}",
                         "installed", cached_arenas != NULL ? Py_True : Py_False,
                         "cached_bytes", (Py_ssize_t)(n_cached * arena_bytes),
                         "limit_bytes", (Py_ssize_t)limit_bytes);
}
