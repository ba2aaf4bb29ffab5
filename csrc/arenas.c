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
 *
 * On Linux, new arenas are cut from slabs aligned to 2 MiB and advised
 * MADV_HUGEPAGE, so that where the system grants transparent huge pages,
 * two arenas take one TLB entry instead of 512. The graph-scaling benchmark
 * at 10^5 steps ran about 6% faster so (benchmarks/RESULTS.md). A cached
 * slab arena is marked MADV_FREE only together with its partner in the same
 * huge page, because advising half of one splits it into small pages.
 */
#include "gradflow.h"

#include <stdint.h>
#include <sys/mman.h>

/* Python also takes smaller blocks through the arena allocator (16 KiB
   chunks of the frame stack), so only blocks at least this large count as
   arenas. */
#define MIN_ARENA_BYTES ((size_t)256 << 10)

static PyObjectArenaAllocator base;
static void **cached_arenas;
static size_t n_cached, limit_bytes;
static size_t arena_bytes;   /* size of Python's arenas, 0 until one is freed */

#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define HUGE_PAGE_BYTES ((size_t)2 << 20)
#define SLAB_BYTES ((size_t)32 << 20)
/* Address space for 2 GiB of slabs; arenas beyond come from Python's own
   allocator, in small pages. */
#define MAX_SLABS 64

static char *slabs[MAX_SLABS];
static int n_slabs;
static char *slab_next, *slab_end;  /* the unused rest of the newest slab */

/* Return whether `ptr` lies in a slab, and so did not come from base.alloc. */
static int
in_slab(const void *ptr)
{
    for (int i = 0; i < n_slabs; i++) {
        if ((const char *)ptr >= slabs[i] && (const char *)ptr < slabs[i] + SLAB_BYTES) {
            return 1;
        }
    }
    return 0;
}

/* A new arena of `size` bytes from a huge-page slab, or NULL. */
static void *
slab_arena(size_t size)
{
    if (size < MIN_ARENA_BYTES || HUGE_PAGE_BYTES % size != 0) {
        return NULL;
    }
    if (slab_next == slab_end) {
        if (n_slabs == MAX_SLABS) {
            return NULL;
        }
        size_t span = SLAB_BYTES + HUGE_PAGE_BYTES;
        char *start = mmap(NULL, span, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (start == MAP_FAILED) {
            return NULL;
        }
        char *slab = (char *)(((uintptr_t)start + HUGE_PAGE_BYTES - 1)
                              & ~(uintptr_t)(HUGE_PAGE_BYTES - 1));
        /* Return the unaligned ends, so that only the slab stays mapped. */
        if (slab > start) {
            munmap(start, slab - start);
        }
        if (start + span > slab + SLAB_BYTES) {
            munmap(slab + SLAB_BYTES, start + span - (slab + SLAB_BYTES));
        }
        /* Without huge pages the slab still serves, in small pages. */
        madvise(slab, SLAB_BYTES, MADV_HUGEPAGE);
        slabs[n_slabs++] = slab;
        slab_next = slab;
        slab_end = slab + SLAB_BYTES;
    }
    void *arena = slab_next;
    slab_next += size;
    return arena;
}

/* Mark the huge page of a cached slab arena free for the system once every
   arena in that page is cached. */
static void
release_huge_page(void *ptr, size_t size)
{
    char *page = (char *)((uintptr_t)ptr & ~(uintptr_t)(HUGE_PAGE_BYTES - 1));
    size_t found = 0;
    for (size_t i = 0; i < n_cached; i++) {
        char *other = cached_arenas[i];
        found += other >= page && other < page + HUGE_PAGE_BYTES;
    }
    if (found * size == HUGE_PAGE_BYTES) {
        madvise(page, HUGE_PAGE_BYTES, MADV_FREE);
    }
}
#else
static int in_slab(const void *ptr) { return 0; }
static void *slab_arena(size_t size) { return NULL; }
#endif

static void *
arena_alloc(void *ctx, size_t size)
{
    if (n_cached > 0 && size == arena_bytes) {
        return cached_arenas[--n_cached];
    }
    void *arena = slab_arena(size);
    return arena != NULL ? arena : base.alloc(base.ctx, size);
}

static void
arena_free(void *ctx, void *ptr, size_t size)
{
    if (arena_bytes == 0 && size >= MIN_ARENA_BYTES) {
        arena_bytes = size;
    }
    int sliced = in_slab(ptr);
    if (size == arena_bytes && (n_cached + 1) * arena_bytes <= limit_bytes) {
        cached_arenas[n_cached++] = ptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (sliced) {
            release_huge_page(ptr, size);
            return;
        }
#endif
#ifdef MADV_FREE
        madvise(ptr, size, MADV_FREE);
#endif
        return;
    }
    if (sliced) {
        munmap(ptr, size);
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
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    Py_ssize_t slab_bytes = (Py_ssize_t)(n_slabs * SLAB_BYTES);
#else
    Py_ssize_t slab_bytes = 0;
#endif
    return Py_BuildValue("{s:O,s:n,s:n,s:n}",
                         "installed", cached_arenas != NULL ? Py_True : Py_False,
                         "cached_bytes", (Py_ssize_t)(n_cached * arena_bytes),
                         "limit_bytes", (Py_ssize_t)limit_bytes,
                         "slab_bytes", slab_bytes);
}
