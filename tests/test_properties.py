"""Property-based gradient tests on random expression graphs.

A strategy draws a recipe: leaf shapes that broadcast against each other
(size-0 and size-1 axes included), then a list of steps, each applying an op
to earlier values, so intermediate values are reused. One interpreter builds
the recipe's graph in gradflow and another builds the same graph in PyTorch.
The loss is a weighted sum of every value, so every step gets a gradient.

Gradients are checked against float64 finite differences (``gf.gradcheck``)
and, where torch is installed, against PyTorch in float32 and float64. On
CUDA the same recipes are compared with the CPU.

CI runs a fixed, derandomized number of examples per test. Set
``GRADFLOW_PROPERTY_EXAMPLES`` (e.g. 2000) for a longer search.
"""

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradflow as gf
from conftest import to_host

EXAMPLES = int(os.environ.get("GRADFLOW_PROPERTY_EXAMPLES", "40"))

# derandomize makes every CI run draw the same examples. The device fixture is
# function-scoped but constant across examples, so its health check is moot.
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Each op keeps values of order 1, so finite differences stay accurate: the
# inputs of log, sqrt, division and pow are mapped to x*x + 0.5 first, and
# exp takes tanh(x).
UNARY = (
    "neg", "square", "tanh", "sigmoid", "sin", "cos", "abs", "relu", "gelu",
    "silu", "softplus", "exp_tanh", "log_pos", "sqrt_pos", "clamp",
)
BINARY = ("add", "sub", "mul", "div_pos", "pow_pos", "maximum", "minimum", "where")
REDUCE = ("sum", "mean", "amax", "logsumexp", "var", "norm")
SHAPE = ("swapaxes", "flatten", "unsqueeze", "broadcast", "permute")
KINDS = ("unary", "binary", "reduce", "shape", "index", "matmul", "cat")


@dataclasses.dataclass
class Recipe:
    steps: list        # ("leaf", shape) or (kind, name, operand indices, params)
    shapes: list       # shape of each value, leaves included
    seed: int          # draws the leaf values and the loss weights

    def leaves(self):
        return [i for i, step in enumerate(self.steps) if step[0] == "leaf"]


# -- the strategy ----------------------------------------------------------


def _broadcast_variant(draw, base):
    """Draw a shape that broadcasts with ``base``: some axes 1, leading ones dropped."""
    start = draw(st.integers(0, len(base)))
    return tuple(1 if draw(st.booleans()) and n else n for n in base[start:])


def _partners(shapes, i):
    found = []
    for j, shape in enumerate(shapes):
        try:
            np.broadcast_shapes(shapes[i], shape)
        except ValueError:
            continue
        found.append(j)
    return found


def _reduce_step(draw, shape, i):
    ndim = len(shape)
    if ndim and draw(st.booleans()):
        axes = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1))))
    else:
        axes = None
    keepdims = draw(st.booleans())
    # Only sum is defined for every reduction of an empty tensor (torch also
    # warns about var of an empty result).
    names = REDUCE if 0 not in shape else ("sum",)
    name = draw(st.sampled_from(names))
    reduced = range(ndim) if axes is None else axes
    out = []
    for a, n in enumerate(shape):
        if a not in reduced:
            out.append(n)
        elif keepdims:
            out.append(1)
    return ("reduce", name, (i,), {"axes": axes, "keepdims": keepdims}), tuple(out)


def _shape_step(draw, shape, i):
    name = draw(st.sampled_from(SHAPE))
    ndim = len(shape)
    if name == "swapaxes" and ndim >= 2:
        out = shape[:-2] + (shape[-1], shape[-2])
        return ("shape", name, (i,), {}), out
    if name == "permute" and ndim >= 2:
        perm = tuple(draw(st.permutations(range(ndim))))
        return ("shape", name, (i,), {"perm": perm}), tuple(shape[p] for p in perm)
    if name == "flatten":
        return ("shape", name, (i,), {}), (int(np.prod(shape, dtype=int)),)
    if name == "unsqueeze":
        axis = draw(st.integers(0, ndim))
        return ("shape", name, (i,), {"axis": axis}), shape[:axis] + (1,) + shape[axis:]
    # "broadcast", and also swapaxes or permute drawn for fewer than two axes.
    out = (2,) + shape
    return ("shape", "broadcast", (i,), {"shape": out}), out


def _index_step(draw, shape, i):
    axes = [a for a, n in enumerate(shape) if n > 0]
    if not axes:
        return None
    axis = draw(st.sampled_from(axes))
    size = shape[axis]
    form = draw(st.sampled_from(("slice", "int", "array")))
    if form == "slice":
        start = draw(st.integers(0, size - 1))
        out = shape[:axis] + (size - start,) + shape[axis + 1:]
        return ("index", form, (i,), {"axis": axis, "start": start}), out
    if form == "int":
        k = draw(st.integers(-size, size - 1))
        out = shape[:axis] + shape[axis + 1:]
        return ("index", form, (i,), {"axis": axis, "k": k}), out
    # Repeated positions are allowed: their gradients must accumulate.
    picks = tuple(draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=4)))
    out = shape[:axis] + (len(picks),) + shape[axis + 1:]
    return ("index", form, (i,), {"axis": axis, "picks": picks}), out


def _cat_step(draw, shapes, i):
    shape = shapes[i]
    if not shape:
        return None
    axis = draw(st.integers(0, len(shape) - 1))
    fits = [
        j for j, other in enumerate(shapes)
        if len(other) == len(shape)
        and all(a == b for k, (a, b) in enumerate(zip(other, shape)) if k != axis)
    ]
    j = draw(st.sampled_from(fits))
    out = shape[:axis] + (shape[axis] + shapes[j][axis],) + shape[axis + 1:]
    return ("cat", "cat", (i, j), {"axis": axis}), out


def _draw_step(draw, steps, shapes):
    kind = draw(st.sampled_from(KINDS))
    i = draw(st.integers(0, len(shapes) - 1))
    shape = shapes[i]
    if kind == "unary":
        return ("unary", draw(st.sampled_from(UNARY)), (i,), {}), shape
    if kind == "binary":
        j = draw(st.sampled_from(_partners(shapes, i)))
        name = draw(st.sampled_from(BINARY))
        return ("binary", name, (i, j), {}), np.broadcast_shapes(shape, shapes[j])
    if kind == "reduce":
        return _reduce_step(draw, shape, i)
    if kind == "shape":
        return _shape_step(draw, shape, i)
    if kind == "index":
        return _index_step(draw, shape, i)
    if kind == "cat":
        return _cat_step(draw, shapes, i)
    if not shape:
        return None
    # matmul with a new leaf of shape (k, n): the product has shape (..., n).
    n = draw(st.integers(1, 3))
    steps.append(("leaf", (shape[-1], n)))
    shapes.append((shape[-1], n))
    return ("binary", "matmul", (i, len(shapes) - 1), {}), shape[:-1] + (n,)


@st.composite
def recipes(draw, max_steps=6):
    """Draw a Recipe of up to three leaves and ``max_steps`` steps."""
    # One recipe in ten may have size-0 axes, so empty tensors are covered
    # without crowding out the rest.
    sizes = st.integers(0, 3) if draw(st.integers(0, 9)) == 0 else st.integers(1, 3)
    base = tuple(draw(st.lists(sizes, min_size=0, max_size=3)))
    steps, shapes = [], []
    for _ in range(draw(st.integers(1, 3))):
        shape = _broadcast_variant(draw, base)
        steps.append(("leaf", shape))
        shapes.append(shape)
    for _ in range(draw(st.integers(1, max_steps))):
        drawn = _draw_step(draw, steps, shapes)
        if drawn is None:
            continue
        step, shape = drawn
        steps.append(step)
        shapes.append(tuple(int(n) for n in shape))
    return Recipe(steps, shapes, draw(st.integers(0, 2**32 - 1)))


# -- the interpreters ------------------------------------------------------


def _leaf_arrays(recipe):
    rng = np.random.default_rng(recipe.seed)
    leaves = [rng.uniform(-1, 1, recipe.shapes[i]) for i in recipe.leaves()]
    weights = [rng.uniform(-1, 1, shape) for shape in recipe.shapes]
    return leaves, weights


def _gf_unary(name, x):
    if name == "neg":
        return -x
    if name == "exp_tanh":
        return gf.exp(gf.tanh(x))
    if name == "log_pos":
        return gf.log(x * x + 0.5)
    if name == "sqrt_pos":
        return gf.sqrt(x * x + 0.5)
    if name == "clamp":
        return gf.clamp(x, -0.5, 0.5)
    return getattr(gf, name)(x)


def _gf_binary(name, a, b):
    table = {
        "add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b,
        "div_pos": lambda: a / (b * b + 0.5), "pow_pos": lambda: (a * a + 0.5) ** b,
        "maximum": lambda: gf.maximum(a, b), "minimum": lambda: gf.minimum(a, b),
        "where": lambda: gf.where(a > 0, a, b), "matmul": lambda: a @ b,
    }
    return table[name]()


def _gf_reduce(name, x, axes, keepdims):
    if name == "var":
        return gf.var(x, axes, keepdims, correction=0)
    if name == "norm":
        return gf.norm(x, axis=axes, keepdims=keepdims)
    return getattr(gf, name)(x, axes, keepdims)


def _index_key(params, as_index):
    head = (slice(None),) * params["axis"]
    if "start" in params:
        return head + (slice(params["start"], None),)
    if "k" in params:
        return head + (params["k"],)
    return head + (as_index(np.array(params["picks"])),)


def _gf_step(step, values):
    kind, name, operands, params = step
    args = [values[i] for i in operands]
    if kind == "unary":
        return _gf_unary(name, *args)
    if kind == "binary":
        return _gf_binary(name, *args)
    if kind == "reduce":
        return _gf_reduce(name, *args, params["axes"], params["keepdims"])
    if kind == "index":
        return args[0][_index_key(params, lambda a: a)]
    if kind == "cat":
        return gf.cat(args, axis=params["axis"])
    x = args[0]
    shape_ops = {
        "swapaxes": lambda: gf.swapaxes(x, -1, -2),
        "permute": lambda: gf.permute(x, *params.get("perm", ())),
        "flatten": lambda: gf.reshape(x, -1),
        "unsqueeze": lambda: gf.unsqueeze(x, params.get("axis", 0)),
        "broadcast": lambda: gf.broadcast_to(x, params.get("shape", ())),
    }
    return shape_ops[name]()


def build_gf(recipe, leaves, weights):
    """Return the loss of ``recipe`` on gradflow ``leaves`` and every value."""
    values, leaf_iter = [], iter(leaves)
    for step in recipe.steps:
        values.append(next(leaf_iter) if step[0] == "leaf" else _gf_step(step, values))
    loss = None
    for value, weight in zip(values, weights):
        term = (value * gf.tensor(weight, dtype=value.dtype, device=value.device)).sum()
        loss = term if loss is None else loss + term
    return loss, values


def _torch_unary(torch, name, x):
    functional = torch.nn.functional
    table = {
        "neg": lambda: -x, "square": lambda: x * x, "abs": lambda: x.abs(),
        "exp_tanh": lambda: torch.exp(torch.tanh(x)),
        "log_pos": lambda: torch.log(x * x + 0.5),
        "sqrt_pos": lambda: torch.sqrt(x * x + 0.5),
        "clamp": lambda: torch.clamp(x, -0.5, 0.5),
        "gelu": lambda: functional.gelu(x), "silu": lambda: functional.silu(x),
        "softplus": lambda: functional.softplus(x),
    }
    if name in table:
        return table[name]()
    return getattr(torch, name)(x)


def _torch_binary(torch, name, a, b):
    table = {
        "add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b,
        "div_pos": lambda: a / (b * b + 0.5), "pow_pos": lambda: (a * a + 0.5) ** b,
        "maximum": lambda: torch.maximum(a, b), "minimum": lambda: torch.minimum(a, b),
        "where": lambda: torch.where(a > 0, a, b), "matmul": lambda: a @ b,
    }
    return table[name]()


def _torch_reduce(torch, name, x, axes, keepdims):
    # torch reads dim=() as "every axis", so a full reduction lists them all,
    # and a 0-d tensor takes dim 0.
    dims = axes if axes is not None else tuple(range(x.ndim)) or (0,)
    table = {
        "sum": lambda: torch.sum(x, dim=dims, keepdim=keepdims),
        "mean": lambda: torch.mean(x, dim=dims, keepdim=keepdims),
        "amax": lambda: torch.amax(x, dim=dims, keepdim=keepdims),
        "logsumexp": lambda: torch.logsumexp(x, dim=dims, keepdim=keepdims),
        "var": lambda: torch.var(x, dim=dims, correction=0, keepdim=keepdims),
        "norm": lambda: torch.linalg.vector_norm(x, dim=dims, keepdim=keepdims),
    }
    return table[name]()


def _torch_step(torch, step, values):
    kind, name, operands, params = step
    args = [values[i] for i in operands]
    if kind == "unary":
        return _torch_unary(torch, name, *args)
    if kind == "binary":
        return _torch_binary(torch, name, *args)
    if kind == "reduce":
        return _torch_reduce(torch, name, *args, params["axes"], params["keepdims"])
    if kind == "index":
        return args[0][_index_key(params, torch.as_tensor)]
    if kind == "cat":
        return torch.cat(args, dim=params["axis"])
    x = args[0]
    shape_ops = {
        "swapaxes": lambda: torch.swapaxes(x, -1, -2),
        "permute": lambda: x.permute(*params.get("perm", ())),
        "flatten": lambda: x.reshape(-1),
        "unsqueeze": lambda: x.unsqueeze(params.get("axis", 0)),
        "broadcast": lambda: torch.broadcast_to(x, params.get("shape", ())),
    }
    return shape_ops[name]()


def build_torch(torch, recipe, leaves, weights):
    values, leaf_iter = [], iter(leaves)
    for step in recipe.steps:
        values.append(
            next(leaf_iter) if step[0] == "leaf" else _torch_step(torch, step, values)
        )
    loss = sum(
        (value * torch.as_tensor(weight, dtype=value.dtype)).sum()
        for value, weight in zip(values, weights)
    )
    return loss, values


def gf_gradients(recipe, dtype, device):
    arrays, weights = _leaf_arrays(recipe)
    leaves = [
        gf.tensor(a, dtype=dtype, device=device, requires_grad=True) for a in arrays
    ]
    loss, values = build_gf(recipe, leaves, weights)
    loss.backward()
    return to_host(loss), [to_host(leaf.grad) for leaf in leaves], values


def _tolerances(dtype):
    if dtype == gf.float64:
        return {"rtol": 1e-6, "atol": 1e-9}
    return {"rtol": 2e-3, "atol": 2e-4}


def _assert_close(actual, expected, dtype, label):
    # The absolute tolerance scales with the largest expected magnitude.
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    tolerance = _tolerances(dtype)
    np.testing.assert_allclose(
        actual, expected, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale,
        err_msg=label,
    )


# -- the properties --------------------------------------------------------


@PROPERTY_SETTINGS
@given(recipe=recipes())
def test_gradients_match_finite_differences(recipe, device):
    arrays, weights = _leaf_arrays(recipe)
    leaves = [
        gf.tensor(a, dtype=gf.float64, device=device, requires_grad=True)
        for a in arrays
    ]
    gf.gradcheck(lambda *xs: build_gf(recipe, list(xs), weights)[0], leaves)


@PROPERTY_SETTINGS
@given(recipe=recipes(), dtype=st.sampled_from([gf.float32, gf.float64]))
def test_gradients_match_torch(recipe, dtype, device):
    torch = pytest.importorskip("torch")
    loss, grads, values = gf_gradients(recipe, dtype, device)
    arrays, weights = _leaf_arrays(recipe)
    torch_dtype = torch.float64 if dtype == gf.float64 else torch.float32
    leaves = [torch.tensor(a, dtype=torch_dtype, requires_grad=True) for a in arrays]
    torch_loss, torch_values = build_torch(torch, recipe, leaves, weights)
    torch_loss.backward()
    for k, (value, expected) in enumerate(zip(values, torch_values)):
        step = recipe.steps[k]
        assert tuple(value.shape) == tuple(expected.shape), f"value {k}: {step}"
    _assert_close(loss, torch_loss.detach().numpy(), dtype, "loss")
    for k, (grad, leaf) in enumerate(zip(grads, leaves)):
        assert grad.dtype == dtype, f"leaf {k}"
        _assert_close(grad, leaf.grad.numpy(), dtype, f"gradient of leaf {k}")


@pytest.mark.skipif(not gf.cuda.is_available(), reason="no usable CUDA device")
@PROPERTY_SETTINGS
@given(recipe=recipes(), dtype=st.sampled_from([gf.float32, gf.float64]))
def test_cuda_matches_cpu(recipe, dtype):
    loss, grads, _ = gf_gradients(recipe, dtype, gf.device("cuda"))
    cpu_loss, cpu_grads, _ = gf_gradients(recipe, dtype, gf.device("cpu"))
    _assert_close(loss, cpu_loss, dtype, "loss")
    for k, (grad, expected) in enumerate(zip(grads, cpu_grads)):
        _assert_close(grad, expected, dtype, f"gradient of leaf {k}")


@PROPERTY_SETTINGS
@given(recipe=recipes(), dtype=st.sampled_from([gf.float32, gf.float64]))
def test_shapes_and_dtypes_kept(recipe, dtype, device):
    _, grads, values = gf_gradients(recipe, dtype, device)
    for k, (value, shape) in enumerate(zip(values, recipe.shapes)):
        assert tuple(value.shape) == shape, f"value {k}: {recipe.steps[k]}"
        assert value.dtype == dtype, f"value {k}: {recipe.steps[k]}"
    for k, (grad, i) in enumerate(zip(grads, recipe.leaves())):
        assert grad.shape == recipe.shapes[i], f"gradient of leaf {k}"
