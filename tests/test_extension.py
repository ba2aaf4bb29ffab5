"""The C extension (gradflow._C) against the Python path it replaces.

The extension must change speed only: every output, gradient, record,
warning and error must be what the Python path gives, bit for bit. Each
comparison runs the same computation twice, once with the extension on and
once with it off, on fresh leaves made from the same arrays.
"""

import copy
import gc
import inspect
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

import gradflow as gf
import gradflow_kernels
from gradflow import _fastpath
from gradflow.errors import GraphFreedError, InplaceModificationError

PURE_PYTHON = _fastpath.extension is None
needs_extension = pytest.mark.skipif(PURE_PYTHON, reason="runs without gradflow._C")
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("GRADFLOW_PURE_PYTHON", "") not in ("", "0"),
                    reason="GRADFLOW_PURE_PYTHON is set")
def test_extension_is_built():
    assert _fastpath.extension is not None, (
        "gradflow._C did not compile or import; reinstall with a C compiler "
        "(pip install -e .) and read the build output"
    )


# -- running a computation on both paths ----------------------------------------

def _run(path, fn, arrays, upstream_seed=1):
    previous = _fastpath.set_enabled(path == "c")
    try:
        leaves = [gf.tensor(a, requires_grad=True) for a in arrays]
        out = fn(*leaves)
        rng = np.random.default_rng(upstream_seed)
        upstream = rng.standard_normal(out.shape).astype(out.dtype)
        record = _describe(out.grad_fn)
        out.backward(gf.tensor(upstream))
        grads = [None if t.grad is None else t.grad.data for t in leaves]
        return out.data, grads, record
    finally:
        _fastpath.set_enabled(previous)


def _describe(ctx):
    """The parts of a record that the Python path defines."""
    saved_types = [type(s).__name__ for s in ctx.saved]
    edges = [e if e is None else ("record", e[1]) if type(e) is tuple else "leaf"
             for e in ctx.edges]
    versions = [(i, int(v)) for i, _, v in getattr(ctx, "_saved_versions", ())]
    return {
        "function": ctx.function, "needs": ctx.needs_input_grad, "edges": edges,
        # A list in Python records, a shared tuple in the elementwise ops' C
        # records: the items are what both paths define.
        "input_meta": list(ctx.input_meta), "out_meta": ctx.out_meta,
        "kinds": ctx._saved_kinds, "saved": saved_types, "versions": versions,
        "fast": ctx._op is not None,
    }


def assert_bitwise(a, b):
    assert type(a) is type(b)
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def assert_paths_agree(fn, arrays, expect_fast=True):
    out_c, grads_c, record_c = _run("c", fn, arrays)
    out_py, grads_py, record_py = _run("python", fn, arrays)
    assert_bitwise(out_c, out_py)
    for g_c, g_py in zip(grads_c, grads_py):
        assert (g_c is None) == (g_py is None)
        if g_c is not None:
            assert_bitwise(g_c, g_py)
    fast_c = record_c.pop("fast")
    assert not record_py.pop("fast")
    assert record_c == record_py
    if expect_fast and not PURE_PYTHON:
        assert fast_c, "the C path did not record this op"


def _values(shape, dtype, positive=False, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    if positive:
        values = np.abs(values) + 0.1
    return np.asarray(values, dtype=dtype)


DTYPES = [np.float32, np.float64]
# () and (5,) run the C path, (3, 4) a 2-D layout, and 20,000 elements the
# Python path (the C path stops below gradflow_kernels.CPU_MIN_SIZE).
SHAPES = [(), (5,), (3, 4), (20_000,)]


def _takes_c_path(shape):
    return int(np.prod(shape)) < gradflow_kernels.CPU_MIN_SIZE

UNARY = {
    "neg": (lambda a: -a, False),
    "exp": (gf.exp, False),
    "log": (gf.log, True),
    "sqrt": (gf.sqrt, True),
    "sin": (gf.sin, False),
    "cos": (gf.cos, False),
    "tanh": (gf.tanh, False),
    "sigmoid": (gf.sigmoid, False),
    "relu": (gf.relu, False),
    "method_tanh": (lambda a: a.tanh(), False),
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_matches_python(name, dtype, shape):
    fn, positive = UNARY[name]
    assert_paths_agree(fn, [_values(shape, dtype, positive)], _takes_c_path(shape))


def test_relu_at_zero_matches_python():
    values = np.array([-1.0, -0.0, 0.0, 2.0], dtype=np.float32)
    assert_paths_agree(gf.relu, [values])


BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "gf_add": gf.add,
    "gf_mul": gf.mul,
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_matches_python(name, dtype, shape):
    arrays = [_values(shape, dtype, seed=1), _values(shape, dtype, positive=True, seed=2)]
    assert_paths_agree(BINARY[name], arrays, _takes_c_path(shape))


@pytest.mark.parametrize("name", sorted(BINARY))
def test_broadcast_binary_matches_python(name):
    # Broadcasting takes the Python path.
    arrays = [_values((4, 1), np.float64, seed=1), _values((1, 5), np.float64, True, seed=2)]
    assert_paths_agree(BINARY[name], arrays, expect_fast=False)


SCALAR = {
    "add_float": lambda a: a + 0.25,
    "sub_float": lambda a: a - 0.1,
    "mul_float": lambda a: a * 0.9,
    "div_float": lambda a: a / 0.3,
    "add_int": lambda a: a + 3,
    "mul_int": lambda a: a * 2,
    "radd": lambda a: 0.5 + a,
    "rsub": lambda a: 1.5 - a,
    "rmul": lambda a: 0.9 * a,
    "rdiv": lambda a: 2.0 / a,
    "rsub_int": lambda a: 1 - a,
    "gf_mul_scalar_first": lambda a: gf.mul(2.5, a),
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", sorted(SCALAR))
def test_scalar_operand_matches_python(name, dtype, shape):
    assert_paths_agree(SCALAR[name], [_values(shape, dtype, positive=True)],
                       _takes_c_path(shape))


GRAPHS = {
    # name: (function, whether its last op has a C path)
    "chain": (lambda a: gf.tanh(gf.tanh(a) * 0.9 + 0.1) * 0.9, True),
    "same_tensor_twice": (lambda a: a * a, True),
    "fan_out": (lambda a: (a * 0.5) + (a * 0.5) * (a * 0.5), True),
    "with_python_ops": (lambda a: gf.tanh(a.reshape(2, 3) * 2.0).sum(axis=0) * 0.5,
                        True),
    "matmul_and_index": (lambda a: (a.reshape(2, 3) @ a.reshape(3, 2))[0] ** 2, False),
    "maximum": (lambda a: gf.maximum(a, a * 0.5), False),
    "square": (gf.square, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_graphs_match_python(name, dtype):
    fn, fast = GRAPHS[name]
    assert_paths_agree(fn, [_values((6,), dtype)], expect_fast=fast)


class _SortWithOrder(gf.autograd.Function):
    """Two outputs, the second not differentiable, and a keyword argument."""

    @staticmethod
    def forward(ctx, x, scale, *, descending=False):
        order = np.argsort(-x if descending else x)
        out = x[order] * scale
        ctx.save_for_backward(order, out, x)
        ctx.mark_non_differentiable(order)
        ctx.scale = scale
        return out, order

    @staticmethod
    def backward(ctx, grad_out, grad_order):
        order, out, x = ctx.saved_tensors
        grad = np.zeros_like(grad_out)
        grad[order] = grad_out * ctx.scale
        return grad, None


def test_custom_function_matches_python():
    def fn(a):
        out, order = _SortWithOrder.apply(a, 3.0, descending=True)
        assert order.grad_fn is None
        assert not order.requires_grad
        return out * 1.0

    assert_paths_agree(fn, [_values((7,), np.float64)])
    for path in ("c", "python"):
        previous = _fastpath.set_enabled(path == "c")
        try:
            out, _ = _SortWithOrder.apply(gf.tensor(_values((7,), np.float64),
                                                    requires_grad=True), 3.0)
        finally:
            _fastpath.set_enabled(previous)
        record = _describe(out.grad_fn)
        # order is output 1, out output 0, x the input; version entries of
        # inputs come first.
        assert record["kinds"] == (1, 0, "input")
        assert record["versions"] == [(2, 0), (0, 0), (1, 0)]


class _ReturnsList(gf.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return [1.0, 2.0]


def test_bad_forward_return_raises(both_paths):
    with pytest.raises(TypeError, match="forward of '_ReturnsList' returned a list"):
        _ReturnsList.apply(_leaf())


def test_parameter_operand_takes_fast_path():
    assert_paths_agree(lambda a: gf.nn.Parameter(a.detach()) * 2.0 + a,
                       [_values((3,), np.float32)])


def test_float16_takes_python_path():
    out_c, grads_c, record_c = _run("c", gf.tanh, [_values((4,), np.float16)])
    assert not record_c["fast"]
    out_py, grads_py, _ = _run("python", gf.tanh, [_values((4,), np.float16)])
    assert_bitwise(out_c, out_py)
    assert_bitwise(grads_c[0], grads_py[0])


def test_mixed_dtypes_promote_as_python():
    arrays = [_values((4,), np.float32), _values((4,), np.float64)]
    assert_paths_agree(lambda a, b: a * b, arrays, expect_fast=False)


# -- floating-point exceptions ------------------------------------------------------

def _outcome(path, fn, errstate):
    """What running fn on the given path gives: values and warnings, or the error."""
    previous = _fastpath.set_enabled(path == "c")
    try:
        with warnings.catch_warnings(record=True) as caught, np.errstate(**errstate):
            warnings.simplefilter("always")
            try:
                result = fn()
            except (FloatingPointError, OverflowError) as exc:
                return ("raised", type(exc), str(exc))
        messages = [str(w.message) for w in caught]
        return ("ok", [np.asarray(r).tobytes() for r in result], messages)
    finally:
        _fastpath.set_enabled(previous)


def _divide_by_zero():
    x = gf.tensor([0.0, 1.0, -2.0], requires_grad=True)
    y = x / 0.0
    return (y.data,)


def _overflow_in_backward():
    x = gf.tensor(np.full(3, 1e30, dtype=np.float32), requires_grad=True)
    y = x * 1e8
    y.backward(gf.tensor(np.full(3, 1e30, dtype=np.float32)))
    return y.data, x.grad.data


def _scalar_out_of_float32_range():
    x = gf.tensor([1.0, 2.0], dtype=gf.float32, requires_grad=True)
    y = x * 1e300
    return (y.data,)


def _tanh_backward_with_huge_gradient():
    x = gf.tensor([0.5, -0.25], dtype=gf.float64, requires_grad=True)
    y = gf.tanh(x)
    y.backward(gf.tensor([1e308, -1e308], dtype=gf.float64))
    return (x.grad.data,)


@pytest.mark.parametrize("errstate", [{}, {"all": "ignore"}, {"all": "raise"}],
                         ids=["default", "ignore", "raise"])
@pytest.mark.parametrize("fn", [_divide_by_zero, _overflow_in_backward,
                                _scalar_out_of_float32_range,
                                _tanh_backward_with_huge_gradient],
                         ids=lambda f: f.__name__.strip("_"))
def test_floating_point_errors_match_python(fn, errstate):
    assert _outcome("c", fn, errstate) == _outcome("python", fn, errstate)


def test_divide_by_zero_warns_on_c_path():
    # The expected warning, written out, so the comparison above cannot pass
    # by both paths staying silent.
    kind, _, messages = _outcome("c", _divide_by_zero, {})
    assert kind == "ok"
    assert any("divide by zero" in m for m in messages)


# -- the engine -------------------------------------------------------------------------

def _leaf(values=(0.5, -1.0, 2.0)):
    return gf.tensor(np.array(values, dtype=np.float64), requires_grad=True)


def test_hook_on_intermediate_replaces_gradient(both_paths):
    x = _leaf()
    y = gf.tanh(x)
    y.register_hook(lambda g: g * 2)
    (y * 3.0).sum().backward()
    expected = 6.0 * (1 - np.tanh(x.data) ** 2)
    np.testing.assert_allclose(x.grad.data, expected, rtol=1e-12)


def test_retain_grad_on_intermediate(both_paths):
    x = _leaf()
    y = x * 2.0
    y.retain_grad()
    (y * y).sum().backward()
    np.testing.assert_array_equal(y.grad.data, 2 * y.data)


def test_retain_graph_accumulates(both_paths):
    x = _leaf()
    y = (gf.exp(x) * x).sum()
    y.backward(retain_graph=True)
    first = x.grad.data.copy()
    y.backward()
    np.testing.assert_array_equal(x.grad.data, first + first)


def test_second_backward_without_retain_raises(both_paths):
    x = _leaf()
    y = (x * x).sum()
    y.backward()
    with pytest.raises(GraphFreedError, match="saved arrays were already freed"):
        y.backward()


def test_inplace_change_of_saved_input_raises(both_paths):
    x = _leaf()
    w = gf.tensor(np.ones(3), requires_grad=False)
    y = (x * w).sum()
    w += 1.0
    with pytest.raises(InplaceModificationError, match="modified in place"):
        y.backward()


def test_failing_hook_restores_grad_mode(both_paths):
    x = _leaf()
    y = x * 2.0

    def fail(grad):
        raise ValueError("hook failed on purpose")

    y.register_hook(fail)
    with pytest.raises(ValueError, match="on purpose"):
        y.sum().backward()
    assert gf.is_grad_enabled()


def test_no_grad_makes_no_record(both_paths):
    x = _leaf()
    with gf.no_grad():
        y = gf.tanh(x) * 2.0
    assert y.grad_fn is None
    assert not y.requires_grad


def test_grad_mode_is_per_thread():
    seen = {}

    def worker():
        seen["enabled"] = gf.is_grad_enabled()
        x = _leaf()
        seen["records"] = (x * 2.0).grad_fn is not None

    with gf.no_grad():
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert not gf.is_grad_enabled()
    assert seen == {"enabled": True, "records": True}


def test_stale_view_is_taken_again():
    def fn(a):
        b = a * 1.0
        view = b.reshape(2, 3)
        b += 1.0  # recorded in place, so the view is stale
        return view * 2.0

    assert_paths_agree(fn, [_values((6,), np.float64)], expect_fast=False)


# -- the op objects --------------------------------------------------------------------

@needs_extension
def test_fast_op_looks_like_its_function():
    assert gf.tanh.__name__ == "tanh"
    assert "tanh" in gf.tanh.__doc__
    assert str(inspect.signature(gf.tanh)) == "(x)"
    assert copy.deepcopy(gf.tanh) is gf.tanh
    assert pickle.loads(pickle.dumps(gf.tanh)) is gf.tanh
    x = _leaf()
    np.testing.assert_array_equal(x.__mul__(2.0).data, x.data * 2.0)
    np.testing.assert_array_equal(getattr(x, "tanh")().data, np.tanh(x.data))


@needs_extension
def test_fast_op_rejects_unknown_name():
    with pytest.raises(ValueError, match="no fast path for op 'pow'"):
        _fastpath.extension.FastOp("pow", lambda a, b: a)


@needs_extension
def test_keyword_arguments_reach_python():
    with pytest.raises(TypeError, match="unexpected keyword"):
        gf.tanh(x=_leaf(), out=None)


# -- the cyclic garbage collector -------------------------------------------------

def _run_script(body):
    script = textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@needs_extension
def test_bookkeeping_attributes_keep_records_untracked():
    # Shapes, axes, window geometry and devices cannot refer to a tensor, so
    # ops that keep them do not switch the collector on.
    result = _run_script("""
        import gc
        import gradflow as gf
        x = gf.randn(1, 2, 6, 6, requires_grad=True)
        conv = gf.nn.Conv2d(2, 3, 3)
        y = gf.tanh(conv(x).reshape(-1).sum(axis=0, keepdims=True) * 2.0)
        y = gf.cat([y[0:1], y]) * 1.0
        assert not gf._fastpath.extension.records_tracked()
        assert not gc.is_tracked(y.grad_fn)
        print("ok")
    """)
    assert result.stdout.strip() == "ok", result.stderr


@needs_extension
def test_inert_later_changes_keep_records_untracked():
    # Attributes that cannot refer to a tensor, set on a record after it was
    # made, do not switch the collector on, and neither do plain arrays
    # assigned to .data.
    result = _run_script("""
        import gc
        import numpy as np
        import gradflow as gf
        x = gf.tensor([1.0, 2.0], requires_grad=True)
        y = x * 2.0
        y.grad_fn.note = "scaled"
        y.grad_fn.shape_seen = (2,)
        y.grad_fn.count = 3
        x.data = np.array([3.0, 4.0], np.float32)
        y.data = np.zeros(2)
        assert not gf._fastpath.extension.records_tracked()
        assert not gc.is_tracked(y.grad_fn)
        print("ok")
    """)
    assert result.stdout.strip() == "ok", result.stderr


@needs_extension
def test_records_start_outside_cyclic_gc():
    result = _run_script("""
        import gc
        import gradflow as gf
        x = gf.tensor([1.0, 2.0], requires_grad=True)
        y = gf.tanh(x * 2.0)
        assert not gc.is_tracked(y.grad_fn)
        x.register_hook(lambda g: g)
        assert gc.is_tracked(y.grad_fn)
        assert gc.is_tracked(y.grad_fn.edges)
        z = y * 3.0
        assert gc.is_tracked(z.grad_fn)
        print("ok")
    """)
    assert result.stdout.strip() == "ok", result.stderr


CYCLES = {
    # x -> its hook -> the closure -> y -> y's records -> their edges -> x
    "hook_after_forward": """
        y = gf.tanh(x * 2.0)
        x.register_hook(lambda g: g * y.data)
    """,
    "hook_before_forward": """
        box = []
        x.register_hook(lambda g: g * box[0].data)
        box.append(gf.tanh(x * 2.0))
    """,
    "hook_on_intermediate": """
        y = x * 2.0
        z = gf.tanh(y)
        y.register_hook(lambda g: g * z.data)
    """,
    # x -> x.grad -> its graph -> the records of x * x -> x
    "create_graph": """
        y = (x * x).sum()
        y.backward(create_graph=True)
    """,
    "graph_in_grad": """
        x.grad = (x * 3.0).detach() * 1.0 + x * 0.0
    """,
    # x -> the record of _Keep -> its attribute box -> a later tensor -> x
    "record_attribute": """
        box = []
        y = _Keep.apply(x, box)
        box.append(gf.tanh(y * 2.0))
    """,
}

_KEEP = """
class _Keep(gf.autograd.Function):
    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad, None
"""


@needs_extension
@pytest.mark.parametrize("name", sorted(CYCLES))
def test_reference_cycles_through_records_are_collected(name):
    # The cycle is built inside a function, so that closures hold their
    # tensors in cells (module-level names would be globals, not a cycle).
    lines = textwrap.dedent(CYCLES[name]).strip().splitlines()
    body = "\n".join(["import gc, weakref", "import gradflow as gf", _KEEP,
                      "def build():",
                      "    x = gf.tensor([1.0, 2.0], requires_grad=True)",
                      *("    " + line for line in lines),
                      "    return weakref.ref(x)",
                      "gc.disable()",
                      "ref = build()",
                      "alive = ref() is not None",
                      "gc.collect()",
                      "print('cycle' if alive else 'no cycle',",
                      "      'collected' if ref() is None else 'leaked')"])
    result = _run_script(body)
    assert result.stdout.strip() == "cycle collected", result.stderr


# -- without the extension ----------------------------------------------------------

def test_pure_python_mode_uses_no_extension():
    env = dict(os.environ, GRADFLOW_PURE_PYTHON="1")
    script = ("import gradflow as gf, gradflow._fastpath as f, types; "
              "assert f.extension is None; "
              "assert isinstance(gf.tanh, types.FunctionType); "
              "x = gf.tensor([1.0], requires_grad=True); "
              "(gf.tanh(x) * 2.0).sum().backward(); print(x.grad.item())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(2 * (1 - np.tanh(1.0) ** 2))


@pytest.mark.skipif(PURE_PYTHON, reason="this run already is the pure-Python run")
def test_suite_passes_in_pure_python():
    # The C path serves most ops in this run, so the Python path, which is
    # the reference and what runs without a compiler, gets a run of its own.
    env = dict(os.environ, GRADFLOW_PURE_PYTHON="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(ROOT / "tests")],
        capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
