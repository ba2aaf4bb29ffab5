"""Edge cases of the C extension (gradflow._C) that tests/test_extension.py leaves out.

The extension must change speed only. So every test here runs the same
computation on the C path and on the Python path (``set_enabled``) and
compares what a user can observe. That is values bit for bit, dtypes,
records, warnings, errors, object lifetimes and the types that custom
backward functions receive. Cases that could crash the interpreter, or that
depend on the process-wide tracking state of the cyclic garbage collector,
run in a fresh subprocess.
"""

import decimal
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref

import numpy as np
import pytest

import gradflow as gf
from gradflow import _fastpath

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_extension = pytest.mark.skipif(_fastpath.extension is None,
                                     reason="runs without gradflow._C")

PATHS = ("c", "python")


def _snapshot(value):
    """Return a comparable description of a result (bytes, dtypes, types and records)."""
    if isinstance(value, gf.Tensor):
        record = None if value.grad_fn is None else _record_of(value.grad_fn)
        return ("tensor", _snapshot(value.data), value.requires_grad, record)
    if isinstance(value, np.ndarray):
        return ("array", type(value).__name__, value.dtype.str, value.shape,
                value.tobytes())
    if isinstance(value, np.generic):
        return ("numpy scalar", type(value).__name__, value.tobytes())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_snapshot(v) for v in value])
    return ("value", repr(value))


def _record_of(ctx):
    edges = [e if e is None else ("record", e[1]) if type(e) is tuple else "leaf"
             for e in ctx.edges]
    versions = [(i, int(v)) for i, _, v in getattr(ctx, "_saved_versions", ())]
    return {
        "function": ctx.function.__qualname__,
        "needs": ctx.needs_input_grad,
        "edges": edges,
        # A list or, in the elementwise ops' C records, a tuple.
        "input_meta": list(ctx.input_meta),
        "out_meta": ctx.out_meta,
        "kinds": ctx._saved_kinds,
        "saved": [type(s).__name__ for s in ctx.saved],
        "versions": versions,
    }


def _outcome(path, fn, errstate=None):
    """Run ``fn`` on one path and return its snapshot (or error) and its warnings."""
    with _fastpath.enabled(path == "c"), warnings.catch_warnings(record=True) as caught, \
            np.errstate(**(errstate or {})):
        warnings.simplefilter("always")
        try:
            result = ("ok", _snapshot(fn()))
        except Exception as exc:  # The error is part of the contract, so it is compared.
            result = ("raised", type(exc).__name__, str(exc))
    return result, [str(w.message) for w in caught]


def assert_paths_agree(fn, errstate=None):
    c_result, c_warnings = _outcome("c", fn, errstate)
    py_result, py_warnings = _outcome("python", fn, errstate)
    assert c_result == py_result
    assert c_warnings == py_warnings


def _run_script(body, env=None):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)], capture_output=True,
        text=True, timeout=120, cwd=ROOT, env=dict(os.environ, **(env or {})),
    )


def _leaf(values=(0.5, -1.0, 2.0)):
    return gf.tensor(np.array(values, dtype=np.float64), requires_grad=True)


def _function(forward, backward):
    """Return a new gf.autograd.Function subclass with the given static methods."""
    return type("Custom", (gf.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


# -- gradients of 0-d tensors --------------------------------------------------

class _RecordGradType(gf.autograd.Function):
    """Pass x through and note the type of the gradient that backward receives."""

    seen = []

    @staticmethod
    def forward(ctx, x):
        return x.copy()

    @staticmethod
    def backward(ctx, grad):
        _RecordGradType.seen.append(type(grad).__name__)
        return grad


ZERO_DIM_OPS = {
    "mul_float": lambda y: y * 3.0,
    "mul_tensor": lambda y: y * y,
    "sub_tensor": lambda y: y - y * 2.0,
    "neg": lambda y: -y,
    "div_float": lambda y: y / 2.0,
    "add_same_twice": lambda y: y + y,
}


@pytest.mark.parametrize("name", sorted(ZERO_DIM_OPS))
def test_zero_dim_gradient_type(name):
    # On 0-d arrays NumPy's operators return NumPy scalars, so the Python
    # backward of these ops hands the next backward a numpy.float64. The C
    # loops return the same, not a 0-d ndarray.
    seen = {}
    for path in PATHS:
        _RecordGradType.seen = []
        with _fastpath.enabled(path == "c"):
            x = gf.tensor(np.array(0.5), requires_grad=True)
            ZERO_DIM_OPS[name](_RecordGradType.apply(x)).backward()
        seen[path] = _RecordGradType.seen
    assert seen["c"] == seen["python"]


def test_zero_dim_leaf_hook_edit():
    # A leaf hook receives the 0-d gradient wrapped in a Tensor. On the Python
    # path that Tensor wraps a fresh array made from a NumPy scalar, so
    # editing it in place leaves x.grad alone. Both paths must agree on that.
    grads = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"):
            x = gf.tensor(np.array(0.5), requires_grad=True)

            def overwrite(grad):
                grad.data[...] = 7.0

            x.register_hook(overwrite)
            (x * 3.0).backward()
            grads[path] = x.grad.item()
    assert grads["python"] == 3.0
    assert grads["c"] == grads["python"]


# -- custom Function outputs ------------------------------------------------------

def test_forward_bad_type_message():
    # Python names the type by its __name__. The tp_name of a type defined in
    # C also contains its module ("decimal.Decimal"), which the message does
    # not show.
    returns_decimal = _function(lambda ctx, x: decimal.Decimal("1.5"), lambda ctx, g: g)
    messages = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"):
            with pytest.raises(TypeError) as info:
                returns_decimal.apply(_leaf())
        messages[path] = str(info.value)
    assert "returned a Decimal;" in messages["python"]
    assert messages["c"] == messages["python"]


class _ShapeRaises:
    @property
    def shape(self):
        raise ValueError("shape failed on purpose")


def test_forward_shape_error_propagates():
    # The Python check is hasattr(out, "shape"), which lets any error but
    # AttributeError through, so the C check does not turn it into a TypeError.
    returns_bad = _function(lambda ctx, x: _ShapeRaises(), lambda ctx, g: g)
    for path in PATHS:
        with _fastpath.enabled(path == "c"):
            with pytest.raises(ValueError, match="shape failed on purpose"):
                returns_bad.apply(_leaf())


def test_forward_odd_outputs_agree():
    # Outputs that take the less common branches of Function.apply: an
    # empty tuple, one array returned twice, a NumPy scalar and an input
    # returned as it is and marked non-differentiable.
    def forward(ctx, x):
        twice = x * 2
        ctx.mark_non_differentiable(x)
        return twice, twice, np.float64(3.0), x

    several = _function(forward, lambda ctx, a, b, c, d: a + b + c + d)
    empty = _function(lambda ctx, x: (), lambda ctx: ())

    def run():
        x = _leaf()
        outputs = several.apply(x)
        (outputs[0] * 1.0 + outputs[1]).sum().backward()
        return [outputs, x.grad, empty.apply(x)]

    assert_paths_agree(run)


def test_apply_many_arguments_agree():
    # More than 16 arguments and keywords take the heap-allocated argument
    # array of the C apply.
    def forward(ctx, *arrays, scale=1.0, **unused):
        ctx.save_for_backward(*arrays[:3], None, "text", 7)
        return sum(arrays) * scale

    def backward(ctx, grad):
        return (grad,) * 20 + (None,)

    many = _function(forward, backward)

    def run():
        leaves = [_leaf() for _ in range(20)]
        out = many.apply(*leaves, 4, scale=2.0, a=1, b=2, c=3, d=4, e=5, f=6)
        out.sum().backward()
        return [out, leaves[0].grad, leaves[-1].grad]

    assert_paths_agree(run)


def test_saved_list_assigned_directly():
    # forward may assign ctx.saved itself, and both paths must resolve it alike.
    def forward(ctx, x):
        ctx.saved = [x, x * 2]
        return x * 3

    direct = _function(forward, lambda ctx, g: g * ctx.saved_tensors[1])

    def run():
        x = _leaf()
        out = direct.apply(x)
        out.sum().backward()
        return [out, x.grad]

    assert_paths_agree(run)


BACKWARD_RESULTS = {
    "tensor": lambda g: gf.tensor(g * 2),
    "numpy_scalar": lambda g: np.float64(2.0),
    "python_float": lambda g: 2.0,
    "list": lambda g: [g],
    "too_many": lambda g: (g, g),
    "none": lambda g: None,
    "wrong_shape": lambda g: np.ones(4),
    "broadcast": lambda g: np.ones((2, 3)),
    "float32": lambda g: g.astype(np.float32),
    "byte_swapped": lambda g: g.astype(">f8"),
    "strided": lambda g: np.ones(6)[::2],
    "raises": lambda g: 1 / 0,
}


@pytest.mark.parametrize("name", sorted(BACKWARD_RESULTS))
def test_backward_odd_results_agree(name):
    odd = _function(lambda ctx, x: x * 1.0, lambda ctx, g: BACKWARD_RESULTS[name](g))

    def run():
        x = _leaf()
        out = odd.apply(x * 1.0) * 2.0 + x * 1.0
        out.sum().backward()
        return [x.grad]

    assert_paths_agree(run)


# -- warnings ----------------------------------------------------------------------

WARNING_OPS = {
    "div_by_zero": lambda x: x / 0.0,
    "log_negative": lambda x: gf.log(x),
    "sqrt_negative": lambda x: gf.sqrt(x),
    "mul_overflow": lambda x: x * 1e308 * 10.0,
}


@pytest.mark.parametrize("name", sorted(WARNING_OPS))
def test_warning_location_matches_python(name):
    # NumPy attributes a RuntimeWarning to the Python frame on top, which on
    # the Python path is gradflow's op code (gradflow/_ops/...). A NumPy call
    # from C would attribute it to the caller, so that filters by module and
    # the default once-per-location rule see another source. The C path
    # therefore hands such cases to Python, and both report the same file.
    files = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            WARNING_OPS[name](gf.tensor(np.array([0.0, -1.0, 2.0]), requires_grad=True))
        files[path] = sorted({w.filename for w in caught})
    assert files["python"]
    assert files["c"] == files["python"]


def test_warning_filter_by_module():
    # This is the visible effect of the warning location. A filter that
    # silences gradflow's own warnings must work on both paths.
    counts = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=RuntimeWarning,
                                    module=r"gradflow\.")
            _ = _leaf() / 0.0
        counts[path] = len(caught)
    assert counts["python"] == 0
    assert counts["c"] == counts["python"]


# -- values -------------------------------------------------------------------------

def _nan32(payload):
    return np.array([0x7FC00000 | payload], dtype=np.uint32).view(np.float32)


NAN_CASES = {
    # Both operands are quiet NaNs with different payloads. IEEE 754 leaves
    # open which payload the result carries, and the compiler may swap the
    # operands of + and *, so a NaN result must come from NumPy's loops.
    "tensor_plus_tensor": lambda a, b: a + b,
    "float_plus_tensor": lambda a, b: float("nan") + a,
}


@pytest.mark.parametrize("name", sorted(NAN_CASES))
def test_nan_payload_matches_numpy(name):
    bits = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"):
            a = gf.tensor(_nan32(1), requires_grad=True)
            b = gf.tensor(_nan32(2), requires_grad=True)
            bits[path] = hex(int(NAN_CASES[name](a, b).data.view(np.uint32)[0]))
    assert bits["c"] == bits["python"]


def test_dtype_metadata_kept():
    # NumPy's ufuncs keep the metadata of the input dtype, which C loops
    # that allocate by type number would drop.
    unit = np.dtype(np.float64, metadata={"unit": "m"})
    metadata = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"):
            x = gf.Tensor(np.ones(3, dtype=unit), requires_grad=True)
            metadata[path] = [(x + x).data.dtype.metadata, (x * 2.0).data.dtype.metadata,
                              (-x).data.dtype.metadata]
    assert metadata["python"][0] == {"unit": "m"}
    assert metadata["c"] == metadata["python"]


def _layout(kind):
    values = np.random.default_rng(3).standard_normal((3, 4))
    if kind == "fortran":
        return np.asfortranarray(values)
    if kind == "transposed":
        return values.T
    if kind == "strided":
        return values[:, ::2]
    if kind == "reversed":
        return values[::-1]
    if kind == "read_only":
        values.setflags(write=False)
        return values
    if kind == "byte_swapped":
        return values.astype(">f8")
    if kind == "unaligned":
        raw = np.frombuffer(b"\0" + values.tobytes(), dtype=np.uint8)[1:]
        return raw.view(np.float64).reshape(3, 4)
    if kind == "empty":
        return np.zeros((0, 4))
    if kind == "zero_dim":
        return np.array(0.75)
    return values.astype(np.float32)


LAYOUTS = ["fortran", "transposed", "strided", "reversed", "read_only",
           "byte_swapped", "unaligned", "empty", "zero_dim", "float32"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_layouts_agree(layout):
    def run():
        x = gf.Tensor(_layout(layout))
        x.requires_grad = True
        out = gf.tanh(x * 1.5 - 0.25) * gf.sigmoid(x) + (2.0 / (x * x + 1.0)) - gf.relu(-x)
        out.backward(gf.tensor(np.full(out.shape, 0.5, dtype=out.dtype)))
        return [out, x.grad]

    assert_paths_agree(run)


# NaN, infinities, signed zeros, the smallest subnormal, a larger subnormal
# and values near the largest finite number, for each dtype.
SPECIAL = {
    np.float32: [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, 1e-40, 1.0, -1.0, 3e38, -3e38],
    np.float64: [np.nan, np.inf, -np.inf, -0.0, 0.0, 5e-324, 1e-310, 1.0, -1.0, 1e308, -1e308],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("errstate", [{}, {"all": "raise"}, {"all": "ignore"}],
                         ids=["default", "raise", "ignore"])
def test_special_values_agree(dtype, errstate):
    # Infinities, signed zeros and subnormals make the C loops raise
    # floating-point flags, so they hand the work back to NumPy. The results
    # and warnings must not show where that happened.
    values = np.array(SPECIAL[dtype], dtype=dtype)

    def run():
        x = gf.tensor(values, requires_grad=True)
        w = gf.tensor(values[::-1].copy(), requires_grad=True)
        out = (x * w + x / 3.0 - 1.0 / w) * gf.exp(-x * x) + gf.tanh(x) * gf.relu(w)
        out.backward(gf.tensor(np.ones_like(values)))
        return [out, x.grad, w.grad]

    assert_paths_agree(run, errstate)


SCALARS = [0, -3, 2**53 + 1, 2**64, 10**400, True, np.bool_(True), np.float32(2.5),
           np.float64(1.5), np.int64(3), 1e300, 1e-300, 5e-324, float("inf")]


@pytest.mark.parametrize("scalar", SCALARS, ids=repr)
def test_scalar_operands_agree(scalar):
    # Only Python floats and ints take the C path. Bools, NumPy scalars and
    # ints too large for a float reach the Python function, and all must end
    # alike.
    def run():
        x = gf.tensor(np.array([0.5, -2.0, 3.0], dtype=np.float32), requires_grad=True)
        out = (x * scalar - scalar / x) + (scalar - x) * 0.5 + x / scalar
        out.backward(gf.tensor(np.ones(3, dtype=np.float32)))
        return [out, x.grad]

    assert_paths_agree(run, {"all": "ignore"})


# -- the engine -------------------------------------------------------------------

def test_custom_op_attribute_ignored():
    # Context keeps the C op code in its `_op` slot. A custom Function that
    # stores its own int under that name must still get its backward
    # called, as on the Python path, which never reads `_op`.
    def forward(ctx, x, mode):
        ctx._op = mode
        return x * 5.0

    scaled = _function(forward, lambda ctx, g: (g * 5.0, None))
    grads = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"):
            x = gf.tensor(np.array([1.0, 2.0]), requires_grad=True)
            scaled.apply(x, 0).sum().backward()
            grads[path] = x.grad.data.tolist()
    assert grads["python"] == [5.0, 5.0]
    assert grads["c"] == grads["python"]


def test_backward_sets_record_xp():
    # The Python engine sets ctx.xp on every record it runs, including the
    # records whose backward the C engine computes itself.
    present = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"):
            x = _leaf()
            y = x * 2.0
            (gf.tanh(y) * y).sum().backward(retain_graph=True)
            present[path] = hasattr(y.grad_fn, "xp")
    assert present["python"]
    assert present["c"] == present["python"]


def _reentrant_in_hook():
    x = _leaf()
    y = x * 2.0
    z = gf.tanh(y)

    def backward_elsewhere(grad):
        (y * 3.0).sum().backward()
        return grad * 2.0

    z.register_hook(backward_elsewhere)
    (z * z).sum().backward()
    return [x.grad]


def _reentrant_in_thread():
    # Another thread walks records of the running walk while that walk waits
    # in a hook. Only one of the two walks may keep its place in the records.
    x = _leaf()
    y = x * 2.0
    z = gf.tanh(y)

    def backward_in_thread(grad):
        thread = threading.Thread(target=lambda: (y * y).sum().backward())
        thread.start()
        thread.join()
        return grad * 2.0

    z.register_hook(backward_in_thread)
    (z * y).sum().backward()
    return [x.grad]


def _walks_in_sequence():
    # Later walks over records an earlier walk entered start afresh.
    x = _leaf()
    y = gf.tanh(x * 2.0)
    grads = []
    for _ in range(3):
        (y * y + y).sum().backward(retain_graph=True)
        grads.append(x.grad.data.copy())
    return grads


class _BackwardInsideBackward(gf.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return np.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with gf.enable_grad():
            inner = gf.tensor(x, requires_grad=True)
            (gf.tanh(inner) * 1.0).backward(gf.tensor(grad))
        return inner.grad.data


def _reentrant_in_function():
    x = _leaf()
    (_BackwardInsideBackward.apply(x * 2.0) * 3.0).sum().backward()
    return [x.grad]


def _nested_checkpoint():
    x = _leaf()
    w = gf.tensor(np.array([1.5, 2.0, -0.5]), requires_grad=True)

    def inner(a):
        return gf.exp(a * 0.5) - a * w

    def outer(a):
        return gf.checkpoint(inner, a * 2.0) * gf.tanh(a)

    gf.checkpoint(outer, x).sum().backward()
    return [x.grad, w.grad]


def _hooks_keep_and_replace():
    kept = []
    x = _leaf()
    y = gf.exp(x)
    y.register_hook(kept.append)
    y.register_hook(lambda g: g * 10.0)
    x.register_hook(lambda g: g.data + 1.0)
    y.retain_grad()
    (y * 2.0 + y).sum().backward()
    return [x.grad, y.grad, kept]


def _double_backward():
    x = _leaf()
    (grad,) = gf.grad((gf.tanh(x) * x * x).sum(), x, create_graph=True)
    (grad * grad).sum().backward()
    return [x.grad, grad]


def _gradient_buffer():
    gf.manual_seed(0)
    layer = gf.nn.Linear(3, 2)
    buffer = gf.nn.utils.GradientBuffer(layer.parameters())
    inputs = gf.tensor(np.ones((4, 3), np.float32))
    for _ in range(2):
        (gf.tanh(layer(inputs)) * 2.0 + 1.0).sum().backward()
    return [p.grad for p in layer.parameters()] + [a.copy() for a in buffer.arrays]


def _deep_chain():
    x = _leaf()
    t = x
    for _ in range(3000):
        t = t * 0.999 + 0.001
    t.sum().backward()
    return [x.grad, t]


def _mixed_paths():
    # Records made by both paths in one graph, walked by either engine.
    x = _leaf()
    t = x
    for fast in (True, False, True):
        _fastpath.set_enabled(fast)
        t = gf.tanh(t * 1.5 + 0.5) * t - t / 3.0
    return t


GRAPHS = {
    "reentrant_in_hook": _reentrant_in_hook,
    "reentrant_in_thread": _reentrant_in_thread,
    "walks_in_sequence": _walks_in_sequence,
    "reentrant_in_function": _reentrant_in_function,
    "nested_checkpoint": _nested_checkpoint,
    "hooks_keep_and_replace": _hooks_keep_and_replace,
    "double_backward": _double_backward,
    "gradient_buffer": _gradient_buffer,
    "deep_chain": _deep_chain,
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_engine_cases_agree(name):
    assert_paths_agree(GRAPHS[name])


@pytest.mark.parametrize("walk", PATHS)
def test_mixed_records_agree(walk):
    results = {}
    for build in PATHS:
        with _fastpath.enabled(build == "c"):
            out = _mixed_paths()
        with _fastpath.enabled(walk == "c"):
            out.sum().backward()
        results[build] = _snapshot(out)
    assert results["c"] == results["python"]


def test_threads_agree():
    # Grad mode is a C thread-local flag. Threads that switch it and run
    # backward while others record must get what the Python path gives.
    def work(seed, results):
        rng = np.random.default_rng(seed)
        for i in range(60):
            x = gf.tensor(rng.standard_normal(5), requires_grad=True)
            mode = gf.no_grad() if i % 3 == 0 else gf.enable_grad()
            with mode:
                y = gf.tanh(x * 1.5 + 0.25) * gf.exp(-x) - x / 3.0
            if y.requires_grad:
                y.sum().backward()
                results.append(x.grad.data.tobytes())
            else:
                results.append(y.data.tobytes())

    outcome = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"):
            results = {seed: [] for seed in range(4)}
            threads = [threading.Thread(target=work, args=(seed, results[seed]))
                       for seed in results]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        outcome[path] = results
    assert outcome["c"] == outcome["python"]


# -- the op objects ------------------------------------------------------------------

@needs_extension
def test_fast_op_weak_reference():
    # A Python function supports weak references, so gf.tanh and bound
    # methods such as x.tanh (weakref.WeakMethod) must keep supporting them.
    ref = weakref.ref(gf.tanh)
    assert ref() is gf.tanh


@needs_extension
def test_fast_op_attribute_assignment():
    # Decorators and registries set attributes on functions, so a FastOp
    # takes them too.
    try:
        gf.Tensor.__mul__.marker = "set by a test"
        assert gf.Tensor.__mul__.marker == "set by a test"
    finally:
        vars(gf.Tensor.__mul__).pop("marker", None)


# -- metadata that elementwise records share ----------------------------------------

@needs_extension
def test_chain_records_share_metadata():
    # Along a chain of one shape and dtype, the C records share one metadata
    # tuple for outputs and one per op for inputs, and every product with a
    # number shares its kinds and version entries.
    with _fastpath.enabled(True):
        y = _leaf()
        records = []
        for _ in range(3):
            y = y * 0.5 + y * 0.5
            records += [y.grad_fn, y.grad_fn.edges[0][0]]
    adds, products = records[2::2], records[3::2]
    assert len({id(r.out_meta) for r in records[2:]}) == 1
    assert len({id(r.input_meta) for r in adds}) == 1
    assert len({id(r.input_meta) for r in products}) == 1
    assert all(r._saved_kinds is products[0]._saved_kinds for r in products)
    assert products[0]._saved_kinds == (None, None)
    assert all(r._saved_versions == () for r in products)


def test_alternating_shapes_and_dtypes_agree():
    # Shared metadata must follow each record's own shape and dtype when
    # records of different ones alternate.
    def fn():
        a = _leaf()
        b = gf.tensor(np.arange(4, dtype=np.float32).reshape(2, 2), requires_grad=True)
        c = gf.tensor(np.ones(3, dtype=np.float32), requires_grad=True)
        outs = []
        x, y, z = a, b, c
        for _ in range(3):
            x, y, z = x * 2.0 + x, y * 0.5 - y, (z + z) * 3.0
            outs += [x, y, z]
        (x.sum() + y.sum() + z.sum()).backward()
        return outs + [a.grad, b.grad, c.grad]

    assert_paths_agree(fn)


# (left shape, right shape, dtype): broadcasts that sum gradients back to
# the inputs' shapes, with leading axes, size-1 axes or both.
BROADCASTS = [
    ((3, 1), (1, 4), np.float32),
    ((4,), (2, 3, 4), np.float64),
    ((1, 1), (5, 5), np.float32),
    ((2, 1, 3), (4, 1), np.float64),
    ((), (3, 2), np.float32),
    ((1, 3), (3,), np.complex128),
]


@pytest.mark.parametrize("left, right, dtype", BROADCASTS,
                         ids=lambda v: str(v) if not isinstance(v, type) else v.__name__)
def test_broadcast_gradients_agree(left, right, dtype):
    def fn():
        rng = np.random.default_rng(3)
        a = gf.tensor(rng.standard_normal(left).astype(dtype), requires_grad=True)
        b = gf.tensor(rng.standard_normal(right).astype(dtype), requires_grad=True)
        out = (a * b + a - b).sum()
        out.backward()
        return [out, a.grad, b.grad]

    assert_paths_agree(fn)


def test_shared_leaf_gradient_copied_once():
    # An add passes one gradient array to both leaves. The first gets a
    # copy and the second the array itself, so the two never share memory,
    # and a second backward accumulates into each separately.
    def fn():
        a, b = _leaf(), _leaf((1.0, 2.0, 3.0))
        ((a + b) * 2.0).backward(gf.ones(3, dtype=gf.float64))
        first = [a.grad.data.copy(), b.grad.data.copy()]
        assert not np.shares_memory(a.grad.data, b.grad.data)
        ((a + b) * 3.0).backward(gf.ones(3, dtype=gf.float64))
        return first + [a.grad, b.grad]

    assert_paths_agree(fn)


@pytest.mark.parametrize("case", ["hooked", "repeated", "has_grad", "subclass", "resized"])
def test_leaf_store_special_cases_agree(case):
    # Leaves that the C engine hands to the Python store: a hook, the same
    # leaf twice, a gradient already there, a Tensor subclass, and a leaf
    # whose data changed shape after the forward (an error).
    class Tagged(gf.Tensor):
        pass

    def fn():
        a = Tagged(np.array([1.0, 2.0])) if case == "subclass" else _leaf((1.0, 2.0))
        a.requires_grad = True
        b = _leaf((3.0, 4.0))
        if case == "hooked":
            a.register_hook(lambda g: g * 10.0)
        if case == "has_grad":
            a.grad = gf.ones(2, dtype=gf.float64)
        out = (a * b + (a if case == "repeated" else b)) * 2.0
        if case == "resized":
            a.data = np.zeros(3)
        out.sum().backward()
        return [a.grad, b.grad]

    assert_paths_agree(fn)


def test_swapped_byte_order_gradient_agree():
    # np.add.reduce returns native byte order, so a big-endian input's
    # broadcast gradient must be cast back, for a leaf and for a hook on an
    # intermediate tensor alike.
    def spread(ctx, a):
        ctx.dtype = a.dtype
        return np.repeat(a, 4, axis=1)

    Spread = _function(spread, lambda ctx, grad: grad.astype(ctx.dtype))

    Same = _function(lambda ctx, a: a.copy(), lambda ctx, grad: grad)

    def fn():
        x = gf.tensor(np.arange(3.0).reshape(3, 1).astype(">f8"), requires_grad=True)
        seen = []
        u = Same.apply(x)
        u.register_hook(lambda g: seen.append(g.data.dtype.str))
        Spread.apply(u).backward(gf.ones((3, 4), dtype=gf.float64))
        return [x.grad, seen]

    assert_paths_agree(fn)


def test_leaf_changed_during_store_agree():
    # Dropping the walk's last reference to one leaf runs its finalizer,
    # which gives the next leaf a gradient. The store must see it there and
    # add to it, as the Python store does.
    Twice = _function(lambda ctx, a, b: a * 2.0 + b * 3.0,
                      lambda ctx, grad: (grad * 2.0, grad * 3.0))

    def forget(ctx, grad):
        records["twice"].edges.clear()
        return grad

    Forget = _function(lambda ctx, a: a.copy(), forget)

    records = {}

    def fn():
        first, second = _leaf((1.0, 1.0)), _leaf((2.0, 2.0))
        out = Twice.apply(Forget.apply(second), first)
        records["twice"] = out.grad_fn
        weakref.finalize(first, setattr, second, "grad", gf.tensor(np.full(2, 100.0)))
        del first
        out.sum().backward()
        return second.grad

    assert_paths_agree(fn)


def test_leaf_alive_until_stored_agree():
    # A hook cuts the root from its record, so only the walk still reaches
    # the leaf a. Its finalizer must run after the gradients are stored, as
    # the Python walk keeps its records until then.
    def fn():
        events = []
        a, b = _leaf((1.0, 2.0)), _leaf((3.0, 4.0))
        y = a * b
        loss = y.sum()
        y.register_hook(lambda g: setattr(loss, "grad_fn", None))

        def finalize():
            events.append("a freed")
            b.grad = gf.tensor(np.full(2, 100.0))

        weakref.finalize(a, finalize)
        del a, y
        loss.backward()
        events.append("after backward")
        return [events, b.grad]

    assert_paths_agree(fn)


def test_float16_sum_warning_location_agree():
    # A float16 broadcast gradient whose sum overflows warns from NumPy's
    # sum, on both walks, so a filter on NumPy's module catches it on both.
    Spread = _function(lambda ctx, a: a * 1,
                       lambda ctx, grad: np.full((4, 3), 60000, np.float16))

    def fn():
        x = gf.tensor(np.ones(3, np.float16), requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Spread.apply(x).backward(np.ones(3, np.float16))
        return [x.grad, [(w.category.__name__, os.path.basename(w.filename)) for w in caught]]

    assert_paths_agree(fn)


@pytest.mark.parametrize("grad_shape", [(2, 3), (4, 2, 3)])
def test_numpy_integer_input_meta_agree(grad_shape):
    # A backward may leave NumPy integers in a record's input shapes; both
    # walks compare them as numbers.
    def backward(ctx, grad):
        shape, dtype = ctx.input_meta[0]
        ctx.input_meta = [(tuple(np.int64(n) for n in shape), dtype)]
        return np.ones(grad_shape)

    Rewrite = _function(lambda ctx, a: a * 1, backward)

    def fn():
        a = gf.tensor(np.ones((2, 3)), requires_grad=True)
        Rewrite.apply(a).sum().backward()
        return a.grad

    assert_paths_agree(fn)


@pytest.mark.parametrize("slot", ["_hooks", "_grad", "_grad_buffer"])
def test_leaf_missing_slot_agree(slot):
    def fn():
        a = _leaf()
        out = (a * 2.0).sum()
        delattr(a, slot)
        out.backward()
        return a._grad

    assert_paths_agree(fn)


# -- crashes and object lifetimes (each in a fresh interpreter) -------------------

@needs_extension
def test_inplace_cycle_collected():
    # sin saves its input t, and t += s then makes t's new record point at
    # sin's record: t -> add record -> sin record -> saved t is a cycle. Fast
    # records start untracked by the cyclic collector, so the in-place op
    # must track them for the cycle (and x) to be collected.
    result = _run_script("""
        import gc, weakref, sys
        import gradflow as gf
        from gradflow import _fastpath

        def build():
            x = gf.tensor([1.0, 2.0], requires_grad=True)
            t = x * 1.0
            s = gf.sin(t)
            t += s
            return weakref.ref(x)

        gc.disable()
        for path in ("c", "python"):
            _fastpath.set_enabled(path == "c")
            ref = build()
            gc.collect()
            print(path, "leaked" if ref() is not None else "collected")
    """)
    assert result.returncode == 0, result.stderr
    assert "python collected" in result.stdout
    assert "c collected" in result.stdout


@needs_extension
def test_apply_input_rebound_in_forward():
    # forward rebinds an input Tensor's .data, so the array it received loses
    # its last owner. The Python apply reads arg.data again when it records,
    # and the C apply must do the same without touching the freed array (a
    # crash under PYTHONMALLOC=debug, a stale input_meta without).
    result = _run_script("""
        import numpy as np
        import gradflow as gf
        from gradflow import _fastpath

        holder = {}

        class Rebind(gf.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                holder["t"].data = np.zeros(5)
                return x * 2.0

            @staticmethod
            def backward(ctx, grad):
                return grad * 2.0

        for path in ("python", "c"):
            _fastpath.set_enabled(path == "c")
            t = gf.tensor(np.ones(3), requires_grad=True)
            holder["t"] = t
            print(path, Rebind.apply(t).grad_fn.input_meta[0][0], flush=True)
    """, env={"PYTHONMALLOC": "debug"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "python (5,)" in result.stdout
    assert "c (5,)" in result.stdout


@needs_extension
def test_edges_cleared_during_delivery():
    # A gradient whose .shape property clears the record's edges runs Python
    # code while the engine iterates those edges. The Python engine stops at
    # the shorter list; the C engine must not read the freed items.
    result = _run_script("""
        import numpy as np
        import gradflow as gf
        from gradflow import _fastpath

        class ClearsEdges(np.ndarray):
            record = None

            @property
            def shape(self):
                if ClearsEdges.record is not None:
                    record, ClearsEdges.record = ClearsEdges.record, None
                    record.edges.clear()
                    record.input_meta.clear()
                return super().shape

        class Sum(gf.autograd.Function):
            @staticmethod
            def forward(ctx, a, b):
                return a + b

            @staticmethod
            def backward(ctx, grad):
                ClearsEdges.record = ctx
                return np.asarray(grad).view(ClearsEdges), grad

        for path in ("python", "c"):
            _fastpath.set_enabled(path == "c")
            a = gf.tensor(np.ones(3), requires_grad=True)
            b = gf.tensor(np.ones(3), requires_grad=True)
            out = Sum.apply(a * 1.0, b * 1.0)
            try:
                out.sum().backward()
            except Exception as exc:
                print(path, "raised", type(exc).__name__, flush=True)
            print(path, "finished", flush=True)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "python finished" in result.stdout
    assert "c finished" in result.stdout


@needs_extension
def test_non_record_grad_fn_raises():
    # Tensor.grad_fn is a plain attribute. With a string there, the Python
    # engine raises AttributeError when it reads the string's .edges, and
    # the C engine, which reads Context slots at fixed offsets, must not
    # crash but raise the same error.
    result = _run_script("""
        import numpy as np
        import gradflow as gf
        from gradflow import _fastpath

        for path in ("python", "c"):
            _fastpath.set_enabled(path == "c")
            x = gf.tensor(np.ones(3), requires_grad=True)
            y = x * 2.0
            y.grad_fn = "not a record"
            try:
                (y * 3.0).sum().backward()
            except AttributeError as exc:
                print(path, "raised", exc, flush=True)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "python raised 'str' object has no attribute 'edges'" in result.stdout
    assert "c raised 'str' object has no attribute 'edges'" in result.stdout
