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
 * slab arena is marked MADV_FREE only once its whole huge page is free,
 * because advising half of one splits it into small pages. A slab arena
 * that the cache has no room for gives its pages back (MADV_DONTNEED) but
 * keeps its address for a later arena, so slabs grow only with the arenas
 * in use at one time, not with every graph built.
 */
#include "gradflow.h"

#include <stdint.h>
#include <sys/mman.h>

/* Python's arenas are 1 MiB on 64-bit builds and 256 KiB on 32-bit ones.
   Other blocks come through the arena allocator too, such as chunks of the
   frame stack (16 KiB, or as large as one frame needs). Those pass straight
   to Python's own allocator. */
#define ARENA_BYTES ((size_t)(SIZEOF_VOID_P > 4 ? 1 << 20 : 256 << 10))

static PyObjectArenaAllocator base;
static void **cached_arenas;
static size_t n_cached, limit_bytes;

#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define HUGE_PAGE_BYTES ((size_t)2 << 20)
#define SLAB_BYTES ((size_t)32 << 20)
/* Address space for 2 GiB of arenas in use at once; arenas beyond come
   from Python's own allocator, in small pages. */
#define MAX_SLABS 64
#define MAX_SLAB_ARENAS (MAX_SLABS * (SLAB_BYTES / ARENA_BYTES))

static char *slabs[MAX_SLABS];
static int n_slabs;
static char *slab_next, *slab_end;  /* the unused rest of the newest slab */
/* Slab arenas whose pages went back to the system (MADV_DONTNEED), kept as
   addresses for new arenas: slabs are never unmapped, so that their space
   serves again and keeps its huge-page alignment. */
static void *returned[MAX_SLAB_ARENAS];
static size_t n_returned;

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

/* Return a new arena from a huge-page slab, or NULL to use base.alloc. */
static void *
slab_arena(void)
{
    if (HUGE_PAGE_BYTES % ARENA_BYTES != 0) {
        return NULL;
    }
    if (n_returned > 0) {
        return returned[--n_returned];
    }
    if ((size_t)(slab_end - slab_next) < ARENA_BYTES) {
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
    slab_next += ARENA_BYTES;
    return arena;
}

/* Count the arenas among the `n` at `arenas` that lie in the huge page at
   `page`. */
static size_t
count_in_page(void *const *arenas, size_t n, const char *page)
{
    size_t found = 0;
    for (size_t i = 0; i < n; i++) {
        const char *arena = arenas[i];
        found += arena >= page && arena < page + HUGE_PAGE_BYTES;
    }
    return found;
}

/* Mark the huge page of a freed slab arena free for the system once no
   arena in it is in use: advising only part of a huge page splits it. A
   cached arena whose neighbour is still in use stays resident until then. */
static void
release_huge_page(const void *ptr)
{
    char *page = (char *)((uintptr_t)ptr & ~(uintptr_t)(HUGE_PAGE_BYTES - 1));
    size_t free_arenas = count_in_page(cached_arenas, n_cached, page)
        + count_in_page(returned, n_returned, page);
    if (free_arenas * ARENA_BYTES == HUGE_PAGE_BYTES) {
        madvise(page, HUGE_PAGE_BYTES, MADV_FREE);
    }
}

/* Take a slab arena that the cache has no room for: its pages go back to
   the system and its address stays for a later arena. */
static void
return_slab_arena(void *ptr)
{
    madvise(ptr, ARENA_BYTES, MADV_DONTNEED);
    returned[n_returned++] = ptr;
    release_huge_page(ptr);
}
#else
static int in_slab(const void *ptr) { return 0; }
static void *slab_arena(void) { return NULL; }
static void release_huge_page(const void *ptr) {}
static void return_slab_arena(void *ptr) {}
#endif

static void *
arena_alloc(void *ctx, size_t size)
{
    if (size != ARENA_BYTES) {
        return base.alloc(base.ctx, size);
    }
    if (n_cached > 0) {
        return cached_arenas[--n_cached];
    }
    void *arena = slab_arena();
    return arena != NULL ? arena : base.alloc(base.ctx, size);
}

static void
arena_free(void *ctx, void *ptr, size_t size)
{
    if (size != ARENA_BYTES) {
        base.free(base.ctx, ptr, size);
        return;
    }
    int sliced = in_slab(ptr);
    if ((n_cached + 1) * ARENA_BYTES <= limit_bytes) {
        cached_arenas[n_cached++] = ptr;
        if (sliced) {
            release_huge_page(ptr);
            return;
        }
#ifdef MADV_FREE
        madvise(ptr, size, MADV_FREE);
#endif
        return;
    }
    if (sliced) {
        return_slab_arena(ptr);
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
    cached_arenas = PyMem_RawMalloc(Py_MAX(limit_bytes / ARENA_BYTES, 1) * sizeof(void *));
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
                         "cached_bytes", (Py_ssize_t)(n_cached * ARENA_BYTES),
                         "limit_bytes", (Py_ssize_t)limit_bytes,
                         "slab_bytes", slab_bytes);
}
