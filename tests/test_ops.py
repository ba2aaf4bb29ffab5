"""Every op's forward value and gradient, from one table of cases.

Each case declares the forward once, as ``fn(m, *inputs)`` where ``m`` is
either the ``gradflow`` module or ``TorchOps`` (PyTorch behind gradflow's
signatures). The harness derives three checks from it: a float64
``gf.gradcheck``, values and gradients against PyTorch on the same input,
and a gradcheck of the first-order gradient built with ``create_graph=True``
(every op in the table has a second derivative in PyTorch). Inputs are drawn
away from kinks, so finite differences are valid.
"""

import dataclasses
import math
import zlib

import numpy as np
import pytest

import gradflow as gf
from conftest import to_host

RTOL = 1e-7
ATOL = 1e-10


class TorchOps:
    """PyTorch's ops behind gradflow's names and ``axis``/``keepdims`` keywords."""

    def __init__(self, torch):
        self.torch = torch
        self.F = torch.nn.functional

    def __getattr__(self, name):
        return getattr(self.torch, name)

    def _reduce(self, fn, x, axis, keepdims, dim, keepdim, **kwargs):
        axis = dim if dim is not None else axis
        dims = tuple(range(x.ndim)) if axis is None else axis
        return fn(x, dim=dims, keepdim=keepdims or keepdim, **kwargs)

    def sum(self, x, axis=None, keepdims=False, *, dim=None, keepdim=False):
        return self._reduce(self.torch.sum, x, axis, keepdims, dim, keepdim)

    def mean(self, x, axis=None, keepdims=False, *, dim=None, keepdim=False):
        return self._reduce(self.torch.mean, x, axis, keepdims, dim, keepdim)

    def var(self, x, axis=None, keepdims=False, *, correction=1, dim=None,
            keepdim=False):
        return self._reduce(self.torch.var, x, axis, keepdims, dim, keepdim,
                            correction=correction)

    def std(self, x, axis=None, keepdims=False, *, correction=1, dim=None,
            keepdim=False):
        return self._reduce(self.torch.std, x, axis, keepdims, dim, keepdim,
                            correction=correction)

    def amax(self, x, axis=None, keepdims=False, *, dim=None, keepdim=False):
        return self._reduce(self.torch.amax, x, axis, keepdims, dim, keepdim)

    def amin(self, x, axis=None, keepdims=False, *, dim=None, keepdim=False):
        return self._reduce(self.torch.amin, x, axis, keepdims, dim, keepdim)

    # Without dim=, gradflow's max and min are torch's amax and amin, which
    # split the gradient evenly among ties.
    max = amax
    min = amin

    def logsumexp(self, x, axis=None, keepdims=False, *, dim=None, keepdim=False):
        return self._reduce(self.torch.logsumexp, x, axis, keepdims, dim, keepdim)

    def norm(self, x, p=2, axis=None, keepdims=False, *, dim=None, keepdim=False):
        axis = dim if dim is not None else axis
        return self.torch.linalg.vector_norm(x, ord=p, dim=axis,
                                             keepdim=keepdims or keepdim)

    def maximum(self, a, b):
        a, b = self._as_tensors(a, b)
        return self.torch.maximum(a, b)

    def minimum(self, a, b):
        a, b = self._as_tensors(a, b)
        return self.torch.minimum(a, b)

    def _as_tensors(self, a, b):
        like = a if isinstance(a, self.torch.Tensor) else b
        return (self.torch.as_tensor(v, dtype=like.dtype) for v in (a, b))

    def gelu(self, x, approximate="none"):
        return self.F.gelu(x, approximate=approximate)

    def silu(self, x):
        return self.F.silu(x)

    def softplus(self, x, beta=1.0, threshold=20.0):
        return self.F.softplus(x, beta=beta, threshold=threshold)

    def leaky_relu(self, x, negative_slope=0.01):
        return self.F.leaky_relu(x, negative_slope)

    def cat(self, tensors, axis=0, dim=None):
        return self.torch.cat(tensors, dim=axis if dim is None else dim)

    def stack(self, tensors, axis=0):
        return self.torch.stack(tensors, dim=axis)

    def split(self, x, sizes, axis=0):
        return self.torch.split(x, sizes, dim=axis)

    def chunk(self, x, chunks, axis=0):
        return self.torch.chunk(x, chunks, dim=axis)

    def permute(self, x, axes):
        return x.permute(axes)

    def expand(self, x, *shape):
        return x.expand(*shape)

    def squeeze(self, x, axis=None):
        return self.torch.squeeze(x) if axis is None else self.torch.squeeze(x, axis)


@dataclasses.dataclass
class Case:
    """One op call: ``fn(m, *inputs)`` on inputs of ``shapes`` drawn from ``domain``.

    ``domain`` is "normal", "positive" (0.5 to 2) or "nonzero" (0.3 to 1.5
    in magnitude, either sign), or a tuple with one of those per input.
    """

    name: str
    fn: object
    shapes: tuple
    domain: object = "normal"


def _draw(rng, shape, domain):
    if domain == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if domain == "nonzero":
        return rng.uniform(0.3, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    return rng.standard_normal(shape)


def _input_arrays(case):
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    domains = case.domain
    if isinstance(domains, str):
        domains = (domains,) * len(case.shapes)
    return [_draw(rng, s, d) for s, d in zip(case.shapes, domains)]


def _outputs(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


# -- the table ----------------------------------------------------------------

BROADCAST_PAIRS = [
    ((3, 4), (3, 4)), ((3, 4), (4,)), ((4,), (3, 4)), ((2, 1, 4), (3, 1)),
    ((3, 1), (1, 4)), ((), (3,)), ((2, 3), ()), ((3, 0), (1,)), ((0, 4), (4,)),
]
BINARY = {
    "add": (lambda m, a, b: a + b, "normal"),
    "sub": (lambda m, a, b: a - b, "normal"),
    "mul": (lambda m, a, b: a * b, "normal"),
    "div": (lambda m, a, b: a / b, ("normal", "nonzero")),
    "pow": (lambda m, a, b: a**b, ("positive", "normal")),
    "maximum": (lambda m, a, b: m.maximum(a, b), "normal"),
    "minimum": (lambda m, a, b: m.minimum(a, b), "normal"),
}


def _binary_cases():
    cases = []
    for name, (fn, domain) in BINARY.items():
        for shape_a, shape_b in BROADCAST_PAIRS:
            label = f"{name}-{shape_a}-{shape_b}".replace(" ", "")
            cases.append(Case(label, fn, (shape_a, shape_b), domain))
    return cases


SCALAR_CASES = [
    Case("add-scalar-right", lambda m, x: x + 2.5, ((3,),)),
    Case("add-scalar-left", lambda m, x: 2.5 + x, ((3,),)),
    Case("sub-scalar-right", lambda m, x: x - 1.5, ((2, 3),)),
    Case("sub-scalar-left", lambda m, x: 1.5 - x, ((2, 3),)),
    Case("mul-scalar-right", lambda m, x: x * -2, ((3,),)),
    Case("mul-scalar-left", lambda m, x: 3 * x, ((3,),)),
    Case("div-scalar-right", lambda m, x: x / 4.0, ((3,),)),
    Case("div-scalar-left", lambda m, x: 2.0 / x, ((3,),), "nonzero"),
    Case("pow-int-exponent", lambda m, x: x**3, ((2, 3),)),
    Case("pow-negative-exponent", lambda m, x: x**-2, ((2, 3),), "nonzero"),
    Case("pow-float-exponent", lambda m, x: x**0.5, ((4,),), "positive"),
    Case("pow-scalar-base", lambda m, x: 2.0**x, ((4,),)),
    Case("pow-function", lambda m, x: m.pow(x, 2.5), ((4,),), "positive"),
    Case("maximum-scalar-right", lambda m, x: m.maximum(x, 0.3), ((2, 3),)),
    Case("minimum-scalar-left", lambda m, x: m.minimum(-0.3, x), ((2, 3),)),
    Case("neg", lambda m, x: -x, ((2, 3),)),
]

UNARY_CASES = [
    Case("exp", lambda m, x: m.exp(x), ((2, 3),)),
    Case("log", lambda m, x: m.log(x), ((2, 3),), "positive"),
    Case("log1p", lambda m, x: m.log1p(x), ((2, 3),), "positive"),
    Case("sqrt", lambda m, x: m.sqrt(x), ((2, 3),), "positive"),
    Case("square", lambda m, x: m.square(x), ((2, 3),)),
    Case("abs", lambda m, x: m.abs(x), ((2, 3),), "nonzero"),
    Case("sin", lambda m, x: m.sin(x), ((2, 3),)),
    Case("cos", lambda m, x: m.cos(x), ((2, 3),)),
    Case("tanh", lambda m, x: m.tanh(x), ((2, 3),)),
    Case("sigmoid", lambda m, x: m.sigmoid(x), ((2, 3),)),
    Case("erf", lambda m, x: m.erf(x), ((2, 3),)),
    Case("relu", lambda m, x: m.relu(x), ((2, 3),), "nonzero"),
    Case("leaky_relu", lambda m, x: m.leaky_relu(x, 0.1), ((2, 3),), "nonzero"),
    Case("gelu", lambda m, x: m.gelu(x), ((2, 3),)),
    Case("gelu-tanh", lambda m, x: m.gelu(x, approximate="tanh"), ((2, 3),)),
    Case("silu", lambda m, x: m.silu(x), ((2, 3),)),
    Case("softplus", lambda m, x: m.softplus(x), ((2, 3),)),
    Case("softplus-beta", lambda m, x: m.softplus(3 * x, beta=2.0, threshold=3.0),
         ((2, 3),), "nonzero"),
    Case("clamp", lambda m, x: m.clamp(x, min=-0.5, max=0.5), ((3, 4),)),
    Case("clamp-min", lambda m, x: m.clamp(x, min=0.2), ((3, 4),)),
    Case("clamp-max", lambda m, x: m.clamp(x, max=-0.2), ((3, 4),)),
    Case("where", lambda m, c, a, b: m.where(c > 0, a, b),
         ((3, 4), (3, 4), (4,)), ("nonzero", "normal", "normal")),
    Case("where-scalar", lambda m, c, a: m.where(c > 0, a, 0.5),
         ((3, 4), (3, 4)), "nonzero"),
]

MATMUL_SHAPES = [
    ((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 4)), ((2, 3), (3, 4)),
    ((2, 2, 3), (2, 3, 4)), ((2, 1, 2, 3), (3, 3, 2)), ((2, 3), (4, 3, 2)),
    ((3,), (2, 3, 4)), ((2, 4, 3), (3,)),
]
MATMUL_CASES = [
    Case(f"matmul-{a}-{b}".replace(" ", ""), lambda m, x, y: x @ y, (a, b))
    for a, b in MATMUL_SHAPES
] + [Case("matmul-function", lambda m, x, y: m.matmul(x, y), ((2, 3), (3, 2)))]


def _reduction(name, axis, keepdims, domain="normal", **kwargs):
    def fn(m, x):
        out = getattr(m, name)(x, axis=axis, keepdims=keepdims, **kwargs)
        # max/min over one int axis return (values, indices) in both libraries.
        return out[0] if isinstance(out, tuple) else out

    extra = "".join(f"-{k}={v}" for k, v in kwargs.items())
    label = f"{name}-axis={axis}-keepdims={keepdims}{extra}".replace(" ", "")
    return Case(label, fn, ((2, 3, 2),), domain)


REDUCTION_AXES = [None, 1, -1, (0, 2), (-1, 0)]
REDUCTION_CASES = [
    _reduction(name, axis, keepdims)
    for name in ("sum", "mean", "var", "std", "amax", "amin", "max", "min",
                 "logsumexp")
    for axis in REDUCTION_AXES
    for keepdims in (False, True)
] + [
    _reduction("norm", axis, keepdims, "nonzero", p=p)
    for p in (1, 2, 3, math.inf)
    for axis, keepdims in ((None, False), (1, False), ((0, 2), True))
] + [
    Case(f"{name}-dim-keepdim", lambda m, x, name=name: getattr(m, name)(
        x, dim=(0, -1), keepdim=True), ((2, 3, 2),))
    for name in ("sum", "mean", "var", "std", "amax", "amin", "logsumexp", "norm")
] + [
    Case(f"{name}-dim-int", lambda m, x, name=name: getattr(m, name)(x, dim=-2),
         ((2, 3, 2),))
    for name in ("sum", "mean", "var", "std", "amax", "amin", "logsumexp", "norm")
] + [
    _reduction("var", 1, False, correction=0),
    _reduction("std", (0, 1), True, correction=0),
    Case("mean-dim-tuple", lambda m, x: m.mean(x, dim=(0, 2)), ((2, 3, 2),)),
    Case("sum-method", lambda m, x: x.sum(), ((2, 3),)),
    Case("sum-empty", lambda m, x: m.sum(x), ((0, 3),)),
]

SHAPE_CASES = [
    Case("reshape", lambda m, x: m.reshape(x, (2, 6)), ((3, 4),)),
    Case("reshape-infer", lambda m, x: x.reshape(-1, 2), ((3, 4),)),
    Case("view", lambda m, x: x.view(12), ((3, 4),)),
    Case("permute", lambda m, x: m.permute(x, (2, 0, 1)), ((2, 3, 4),)),
    Case("transpose", lambda m, x: m.transpose(x, 0, 2), ((2, 3, 4),)),
    Case("swapaxes", lambda m, x: m.swapaxes(x, -1, 0), ((2, 3, 4),)),
    Case("T", lambda m, x: x.T, ((2, 3),)),
    Case("mT", lambda m, x: x.mT, ((2, 3, 4),)),
    Case("broadcast_to", lambda m, x: m.broadcast_to(x, (2, 3, 4)), ((3, 1),)),
    Case("expand", lambda m, x: m.expand(x, 2, -1, 4), ((3, 1),)),
    Case("squeeze-all", lambda m, x: m.squeeze(x), ((1, 3, 1, 2),)),
    Case("squeeze-axis", lambda m, x: m.squeeze(x, 2), ((1, 3, 1, 2),)),
    Case("unsqueeze", lambda m, x: m.unsqueeze(x, -1), ((2, 3),)),
    Case("flatten", lambda m, x: m.flatten(x, 1), ((2, 3, 2),)),
    Case("flatten-range", lambda m, x: m.flatten(x, 0, 1), ((2, 3, 2),)),
    Case("cat-axis0", lambda m, a, b, c: m.cat([a, b, c]), ((1, 3), (2, 3), (3, 3))),
    Case("cat-axis-negative", lambda m, a, b: m.cat([a, b], axis=-1),
         ((2, 1), (2, 3))),
    Case("cat-dim", lambda m, a, b: m.cat([a, b], dim=1), ((2, 2), (2, 3))),
    Case("stack", lambda m, a, b: m.stack([a, b]), ((2, 3), (2, 3))),
    Case("stack-last", lambda m, a, b: m.stack([a, b], axis=-1), ((2, 3), (2, 3))),
    Case("split-int", lambda m, x: m.split(x, 2), ((5, 2),)),
    Case("split-list", lambda m, x: m.split(x, [1, 3], axis=1), ((2, 4),)),
    Case("chunk", lambda m, x: m.chunk(x, 3, axis=-1), ((2, 7),)),
    Case("clone", lambda m, x: x.clone() * 2, ((2, 3),)),
]

INDEX_CASES = [
    Case("index-int", lambda m, x: x[1], ((3, 4),)),
    Case("index-negative", lambda m, x: x[-1, -2], ((3, 4),)),
    Case("index-slices", lambda m, x: x[1:, ::2], ((3, 4),)),
    Case("index-ellipsis", lambda m, x: x[..., 0], ((2, 3, 4),)),
    Case("index-none", lambda m, x: x[None, 1], ((3, 4),)),
    Case("index-list-repeated", lambda m, x: x[[0, 2, 0, 0]], ((3, 4),)),
    Case("index-pairs-repeated", lambda m, x: x[[0, 1, 0], [1, 2, 1]], ((3, 4),)),
    Case("index-mixed", lambda m, x: x[:, [1, 1, 3]], ((3, 4),)),
    Case("index-bool-mask", lambda m, x: x[x > 0], ((3, 4),), "nonzero"),
]

CASES = (
    _binary_cases() + SCALAR_CASES + UNARY_CASES + MATMUL_CASES
    + REDUCTION_CASES + SHAPE_CASES + INDEX_CASES
)


def _params(cases):
    return [pytest.param(c, id=c.name) for c in cases]


# -- the harness --------------------------------------------------------------


def _gf_inputs(case, device):
    return [
        gf.tensor(a, device=device, requires_grad=True) for a in _input_arrays(case)
    ]


def _weights(outputs):
    rng = np.random.default_rng(7)
    return [rng.standard_normal(o.shape) for o in outputs]


@pytest.mark.parametrize("case", _params(CASES))
def test_gradcheck(case, device):
    inputs = _gf_inputs(case, device)
    assert gf.gradcheck(lambda *xs: case.fn(gf, *xs), inputs)


@pytest.mark.parametrize("case", _params(CASES))
def test_matches_torch(case, device):
    torch = pytest.importorskip("torch")
    arrays = _input_arrays(case)
    gf_inputs = _gf_inputs(case, device)
    torch_inputs = [torch.tensor(a, requires_grad=True) for a in arrays]

    gf_out = _outputs(case.fn(gf, *gf_inputs))
    torch_out = _outputs(case.fn(TorchOps(torch), *torch_inputs))
    assert len(gf_out) == len(torch_out)
    for ours, theirs in zip(gf_out, torch_out):
        assert ours.shape == tuple(theirs.shape)
        expected = theirs.detach().numpy()
        np.testing.assert_allclose(to_host(ours), expected, rtol=RTOL, atol=ATOL)

    weights = _weights(gf_out)
    gf_grads = gf.grad(
        list(gf_out), gf_inputs, allow_unused=True,
        grad_outputs=[gf.tensor(w, device=device) for w in weights],
    )
    torch_grads = torch.autograd.grad(
        torch_out, torch_inputs, allow_unused=True,
        grad_outputs=[torch.tensor(w) for w in weights],
    )
    for ours, theirs, array in zip(gf_grads, torch_grads, arrays):
        ours = np.zeros_like(array) if ours is None else to_host(ours)
        theirs = np.zeros_like(array) if theirs is None else theirs.numpy()
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


def _first_order(case, weights):
    def gradient(*xs):
        outputs = _outputs(case.fn(gf, *xs))
        total = sum(
            (o * gf.tensor(w, device=o.device)).sum() for o, w in zip(outputs, weights)
        )
        grads = gf.grad(total, list(xs), create_graph=True, allow_unused=True)
        return tuple(
            gf.zeros_like(x) if g is None else g for x, g in zip(xs, grads)
        )

    return gradient


@pytest.mark.parametrize("case", _params(CASES))
def test_second_order_gradcheck(case, device):
    inputs = _gf_inputs(case, device)
    with gf.no_grad():
        weights = _weights(_outputs(case.fn(gf, *inputs)))
    assert gf.gradcheck(_first_order(case, weights), inputs)


# -- max/min with dim=, and argmax/argmin -------------------------------------


@pytest.mark.parametrize("name", ["max", "min"])
@pytest.mark.parametrize("keepdim", [False, True])
def test_max_min_dim_matches_torch(name, keepdim, device):
    torch = pytest.importorskip("torch")
    array = np.random.default_rng(3).permutation(12).reshape(3, 4).astype(np.float64)
    x = gf.tensor(array, device=device, requires_grad=True)
    reference = torch.tensor(array, requires_grad=True)

    values, indices = getattr(gf, name)(x, dim=1, keepdim=keepdim)
    expected_values, expected_indices = getattr(torch, name)(
        reference, dim=1, keepdim=keepdim
    )
    np.testing.assert_array_equal(to_host(values), expected_values.detach().numpy())
    np.testing.assert_array_equal(to_host(indices), expected_indices.numpy())
    assert not indices.requires_grad

    weights = np.arange(1.0, 1.0 + values.data.size).reshape(values.shape)
    values.backward(gf.tensor(weights, device=device))
    expected_values.backward(torch.tensor(weights))
    np.testing.assert_array_equal(to_host(x.grad), reference.grad.numpy())


def test_max_positional_axis_unpacks(device):
    x = gf.tensor([[1.0, 5.0, 2.0], [3.0, 2.0, 0.0]], device=device)
    values, indices = x.max(1)
    np.testing.assert_array_equal(to_host(values), [5.0, 3.0])
    np.testing.assert_array_equal(to_host(indices), [1, 0])


def test_max_tuple_axis_returns_values(device):
    x = gf.tensor([[1.0, 5.0], [7.0, 2.0]], device=device)
    assert isinstance(x.max(axis=(0, 1)), gf.Tensor)
    assert isinstance(x.max(), gf.Tensor)


def test_max_dim_named_fields(device):
    x = gf.tensor([[1.0, 5.0], [7.0, 2.0]], device=device)
    result = x.max(dim=0)
    np.testing.assert_array_equal(to_host(result.values), [7.0, 5.0])
    np.testing.assert_array_equal(to_host(result.indices), [1, 0])


@pytest.mark.parametrize("name", ["argmax", "argmin"])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_argmax_argmin_match_numpy(name, axis, device):
    array = np.random.default_rng(4).standard_normal((3, 4))
    result = getattr(gf, name)(gf.tensor(array, device=device), axis=axis)
    np.testing.assert_array_equal(to_host(result), getattr(np, name)(array, axis=axis))


# -- gradients at non-differentiable points -----------------------------------


def _grad_at(fn, values, device):
    x = gf.tensor(values, dtype=gf.float64, device=device, requires_grad=True)
    fn(x).sum().backward()
    return to_host(x.grad)


def test_relu_grad_at_zero(device):
    assert _grad_at(gf.relu, [0.0], device)[0] == 0.0


def test_relu_grad_passes_nan(device):
    # PyTorch zeroes the gradient only where the output is <= 0.
    assert _grad_at(gf.relu, [float("nan")], device)[0] == 1.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_fused_grad_passes_nan(dtype):
    import gradflow_kernels

    size = gradflow_kernels.CPU_MIN_SIZE
    values = np.zeros(size, dtype=dtype)
    values[[0, 5]] = np.nan
    values[7] = 2.0
    x = gf.tensor(values, requires_grad=True)
    gf.relu(x).sum().backward()
    grad = to_host(x.grad)
    assert grad[0] == 1.0
    assert grad[5] == 1.0
    assert grad[7] == 1.0
    assert grad[1] == 0.0


def test_abs_grad_at_zero(device):
    assert _grad_at(gf.abs, [0.0], device)[0] == 0.0


def test_leaky_relu_grad_at_zero(device):
    grad = _grad_at(lambda x: gf.leaky_relu(x, 0.1), [0.0], device)
    assert grad[0] == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["maximum", "minimum"])
def test_tie_splits_gradient_evenly(name, device):
    a = gf.tensor([2.0, 1.0], dtype=gf.float64, device=device, requires_grad=True)
    b = gf.tensor([2.0, 3.0], dtype=gf.float64, device=device, requires_grad=True)
    getattr(gf, name)(a, b).sum().backward()
    expected_a = [0.5, 0.0] if name == "maximum" else [0.5, 1.0]
    np.testing.assert_array_equal(to_host(a.grad), expected_a)
    np.testing.assert_array_equal(to_host(b.grad), 1.0 - np.array(expected_a))


@pytest.mark.parametrize("name", ["amax", "amin", "max", "min"])
def test_reduction_tie_splits_gradient(name, device):
    torch = pytest.importorskip("torch")
    values = [3.0, -1.0, 3.0, 3.0] if "max" in name else [-2.0, 1.0, -2.0, 5.0]
    grad = _grad_at(getattr(gf, name), values, device)
    reference = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    getattr(torch, "a" + name.lstrip("a"))(reference).backward()
    np.testing.assert_allclose(grad, reference.grad.numpy())


@pytest.mark.parametrize("p", [2, 3])
def test_norm_grad_at_zero_vector(p, device):
    grad = _grad_at(lambda x: gf.norm(x, p), [0.0, 0.0, 0.0], device)
    np.testing.assert_array_equal(grad, [0.0, 0.0, 0.0])


def test_clamp_grad_at_bounds_matches_torch(device):
    torch = pytest.importorskip("torch")
    values = [-1.0, -0.5, 0.0, 0.5, 1.0]
    grad = _grad_at(lambda x: gf.clamp(x, -0.5, 0.5), values, device)
    reference = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    torch.clamp(reference, -0.5, 0.5).sum().backward()
    np.testing.assert_array_equal(grad, reference.grad.numpy())


def test_clamp_tensor_min_gradient(device):
    x = gf.tensor([0.25, 4.0], dtype=gf.float64, device=device, requires_grad=True)
    low = gf.tensor([1.0, 1.0], dtype=gf.float64, device=device)
    gf.clamp(x, min=low).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [0.0, 1.0])


# -- stable formulas at extremes ----------------------------------------------

EXTREMES = [-1000.0, -50.0, 0.0, 50.0, 1000.0]
STABLE_OPS = {
    "sigmoid": (lambda m, x: m.sigmoid(x), None),
    "softplus": (lambda m, x: m.softplus(x), "softplus"),
    "logsumexp": (lambda m, x: m.logsumexp(m.stack([x, 0.5 * x]), axis=0), None),
    "silu": (lambda m, x: m.silu(x), None),
    "tanh": (lambda m, x: m.tanh(x), None),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(STABLE_OPS))
def test_stable_at_extremes(name, dtype, device):
    torch = pytest.importorskip("torch")
    fn = STABLE_OPS[name][0]
    x = gf.tensor(EXTREMES, dtype=dtype, device=device, requires_grad=True)
    reference = torch.tensor(EXTREMES, dtype=getattr(torch, dtype), requires_grad=True)
    out = fn(gf, x)
    expected = fn(TorchOps(torch), reference)
    out.sum().backward()
    expected.sum().backward()

    assert np.isfinite(to_host(out)).all()
    assert np.isfinite(to_host(x.grad)).all()
    rtol = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(to_host(out), expected.detach().numpy(), rtol=rtol)
    np.testing.assert_allclose(to_host(x.grad), reference.grad.numpy(), rtol=rtol)


def test_logsumexp_of_minus_infinity(device):
    x = gf.tensor([-np.inf, -np.inf], device=device)
    assert to_host(gf.logsumexp(x)) == -np.inf


# -- op errors ----------------------------------------------------------------


def test_broadcast_error_names_shapes(device):
    a = gf.zeros(2, 3, device=device)
    b = gf.zeros(4, device=device)
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\)"):
        a + b


def test_matmul_error_names_shapes(device):
    a = gf.zeros(2, 3, device=device)
    b = gf.zeros(4, 2, device=device)
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4, 2\) are not aligned"):
        a @ b


def test_reduction_axis_out_of_range(device):
    with pytest.raises(IndexError, match="sum: axis 3 is out of range"):
        gf.zeros(2, 3, device=device).sum(axis=3)


def test_float_op_rejects_integer(device):
    with pytest.raises(TypeError, match="exp: expected a floating-point tensor"):
        gf.exp(gf.arange(3, device=device))


# -- indexing details ---------------------------------------------------------


def test_repeated_index_accumulates(device):
    x = gf.tensor([1.0, 2.0, 3.0], dtype=gf.float64, device=device, requires_grad=True)
    x[[0, 0, 2, 0]].sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [3.0, 0.0, 1.0])


def test_integer_tensor_index(device):
    x = gf.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=gf.float64, device=device,
                  requires_grad=True)
    index = gf.tensor([1, 1], device=device)
    out = x[index]
    np.testing.assert_array_equal(to_host(out), [[3.0, 4.0], [3.0, 4.0]])
    out.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [[0.0, 0.0], [2.0, 2.0]])


def test_float_index_raises(device):
    x = gf.zeros(3, device=device)
    with pytest.raises(IndexError, match="integer or bool"):
        x[gf.tensor([0.0], device=device)]


def test_index_out_of_range_names_shape(device):
    with pytest.raises(IndexError, match=r"shape \(3,\)"):
        gf.zeros(3, device=device)[5]


# -- edge cases that PyTorch defines ------------------------------------------


def test_pow_zero_exponent_grad_at_zero(device):
    x = gf.tensor([0.0, 0.0, 1.0], device=device, requires_grad=True)
    (x ** gf.tensor([0.0, 1.0, 2.0], device=device)).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [0.0, 1.0, 2.0])


def test_pow_scalar_zero_grad_at_zero(device):
    x = gf.tensor([0.0, 2.0], device=device, requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [0.0, 0.0])


def test_std_grad_of_constant_is_zero(device):
    x = gf.tensor([2.0, 2.0, 2.0], device=device, requires_grad=True)
    x.std().backward()
    np.testing.assert_array_equal(to_host(x.grad), [0.0, 0.0, 0.0])


def test_var_without_dof_gives_nan(device):
    x = gf.tensor([5.0], device=device, requires_grad=True)
    value = x.var()
    value.backward()
    assert np.isnan(value.item())
    assert np.isnan(to_host(x.grad)[0])


@pytest.mark.parametrize("name, size, fill, expected", [
    ("mean", 1000, 100.0, 100.0),
    ("mean", 70000, 1.0, 1.0),
    ("var", 1000, 100.0, 0.0),
])
def test_float16_reduction_accumulates_wide(name, size, fill, expected, device):
    x = gf.full((size,), fill, dtype=gf.float16, device=device)
    result = getattr(x, name)()
    assert result.dtype == np.float16
    assert result.item() == expected


def test_pow_exponent_grad_negative_at_zero(device):
    base = gf.tensor([0.0, 1.0], device=device, dtype=gf.float64, requires_grad=True)
    exponent = gf.tensor([-1.0, -1.0], device=device, dtype=gf.float64,
                         requires_grad=True)
    (base ** exponent).sum().backward()
    assert to_host(exponent.grad)[0] == -np.inf
    assert to_host(exponent.grad)[1] == 0.0
