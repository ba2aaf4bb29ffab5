"""The cache of freed object arenas (csrc/arenas.c) and its setting."""

import pathlib
import sys

import pytest

from gradflow import _fastpath
from fresh_python import output_lines, run_python

needs_extension = pytest.mark.skipif(_fastpath.extension is None,
                                     reason="the C extension is not built")

# Builds a graph of about 25 MB, frees it, and builds it again. Prints the
# page faults of each build, the bytes the cache held in between, the bytes
# of huge-page slabs, and the lazily freed kB in between (-1 where the
# system does not report them).
_REBUILD = """
import resource
import gradflow as gf
from gradflow import _fastpath

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def lazy_free_kb():
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("LazyFree:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1

def build(steps=25000):
    x = gf.tensor([0.5], requires_grad=True)
    y = x
    for _ in range(steps):
        y = y * 0.5 + y * 0.5
    return y

info = _fastpath.extension.arena_cache_info()
start = faults()
y = build()
first = faults() - start
del y
freed = _fastpath.extension.arena_cache_info()
lazy = lazy_free_kb()
start = faults()
y = build()
second = faults() - start
print(info["installed"], info["limit_bytes"], first, freed["cached_bytes"], second,
      freed["slab_bytes"], lazy)
"""


def test_limit_defaults_to_256_mib():
    assert _fastpath.arena_cache_limit({}) == 256
    assert _fastpath.arena_cache_limit({"GRADFLOW_ARENA_CACHE_MB": "  "}) == 256


@pytest.mark.parametrize("setting, limit", [("0", 0), ("64", 64), (" 12 ", 12)])
def test_limit_reads_whole_mib(setting, limit):
    assert _fastpath.arena_cache_limit({"GRADFLOW_ARENA_CACHE_MB": setting}) == limit


@pytest.mark.parametrize("setting", ["x", "-3", "1.5", "64MB"])
def test_bad_limit_names_the_variable(setting):
    with pytest.raises(ValueError, match="GRADFLOW_ARENA_CACHE_MB must be a whole number"):
        _fastpath.arena_cache_limit({"GRADFLOW_ARENA_CACHE_MB": setting})


@needs_extension
def test_rebuilt_graph_reuses_the_freed_arenas():
    # Without MKL, whose loading at import grows the C heap that the first
    # build would otherwise fault in.
    lines = output_lines(_REBUILD, GRADFLOW_BLAS="numpy")
    installed, limit, first, cached, second, _, _ = lines[-1].split()
    assert installed == "True"
    assert int(limit) == 256 << 20
    # The first build faults in fresh arenas (one fault per 2 MiB where they
    # get huge pages, per 4 KiB otherwise), and freeing the graph caches them.
    assert int(first) > 100
    assert int(cached) >= 16 << 20
    assert int(second) < int(first) // 4


@needs_extension
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page slabs are Linux only")
def test_arenas_come_from_huge_page_slabs():
    _, _, _, cached, _, slab_bytes, lazy_kb = output_lines(_REBUILD)[-1].split()
    assert int(slab_bytes) >= 32 << 20
    if int(lazy_kb) < 0:
        pytest.skip("the system does not report lazily freed memory")
    # Cached arenas go to the system in whole huge pages, so only those whose
    # partner arena is still in use stay unadvised: a few at most here.
    assert int(lazy_kb) << 10 >= int(cached) - (4 << 20)


# A frame with 20,000 locals makes Python take a 256 KiB chunk of frame
# stack through the arena allocator. Such blocks must not come from the
# slabs, whose 1 MiB arenas would then run past a slab's end. The script
# then fills more than one slab with objects and still caches arenas.
_LARGE_FRAME = """
import gradflow as gf
from gradflow import _fastpath

namespace = {}
body = "".join(f"    v{i} = {i}\\n" for i in range(20000))
exec("def large():\\n" + body + "    return 0\\n", namespace)
namespace["large"]()
objects = [[float(i)] for i in range(1_000_000)]
del objects
print(_fastpath.extension.arena_cache_info()["cached_bytes"])
"""


@needs_extension
def test_large_frame_chunk_leaves_arenas_intact():
    (cached,) = output_lines(_LARGE_FRAME)[-1].split()
    assert int(cached) >= 16 << 20


# Builds and frees a graph of about 30 MB five times with a 1 MiB cache, and
# prints the bytes of slabs after each build.
_CHURN = """
import gradflow as gf
from gradflow import _fastpath

for _ in range(5):
    x = gf.tensor([0.5], requires_grad=True)
    y = x
    for _ in range(30000):
        y = y * 0.5 + y * 0.5
    print(_fastpath.extension.arena_cache_info()["slab_bytes"])
    del x, y
"""


@needs_extension
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page slabs are Linux only")
def test_slabs_serve_again_after_churn():
    # Arenas beyond the cache's limit give their pages back but keep their
    # addresses, so later graphs reuse the slabs instead of mapping more.
    sizes = [int(line) for line in output_lines(_CHURN, GRADFLOW_ARENA_CACHE_MB="1")]
    assert len(sizes) == 5
    assert sizes[0] >= 32 << 20
    assert sizes[-1] == sizes[0]


@needs_extension
def test_zero_leaves_the_allocator_alone():
    installed, limit, first, cached, second, slab_bytes, _ = output_lines(
        _REBUILD, GRADFLOW_ARENA_CACHE_MB="0")[-1].split()
    assert installed == "False"
    assert int(cached) == 0
    assert int(slab_bytes) == 0
    # Python returned the freed arenas, so the second build faults again.
    assert int(second) > int(first) // 4


@needs_extension
def test_bad_setting_fails_the_import_with_its_name():
    result = run_python("import gradflow", GRADFLOW_ARENA_CACHE_MB="lots")
    assert result.returncode != 0
    assert "GRADFLOW_ARENA_CACHE_MB must be a whole number of MiB" in result.stderr
    assert "'lots'" in result.stderr


@needs_extension
def test_negative_limit_is_refused():
    with pytest.raises(ValueError, match="0 or more MiB, got -1"):
        _fastpath.extension.cache_arenas(-1)


@needs_extension
def test_cache_installs_once():
    if not _fastpath.extension.arena_cache_info()["installed"]:
        pytest.skip("this test process runs with the arena cache off")
    with pytest.raises(RuntimeError, match="already installed"):
        _fastpath.extension.cache_arenas(16)
