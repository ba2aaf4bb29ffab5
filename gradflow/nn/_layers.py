"""Basic layers: Linear, activations, Dropout, Flatten and the module containers."""

import math
import operator

from .. import _ops
from .._factories import empty
from .._ops._common import matmul_arrays
from ..autograd import Function
from . import init
from ._dropout import check_dropout_p, dropout
from ._module import Module, Parameter
from ._softmax import log_softmax, softmax

__all__ = [
    "linear", "Linear", "Identity", "Flatten", "ReLU", "LeakyReLU", "GELU",
    "Tanh", "Sigmoid", "SiLU", "Softplus", "Softmax", "LogSoftmax", "Dropout",
    "Sequential", "ModuleList", "ModuleDict",
]


def linear(x, weight, bias=None):
    """Return ``x @ weight.T + bias``.

    ``x`` has shape (..., in_features), ``weight`` (out_features, in_features)
    and ``bias`` (out_features,). A weight with requires_grad=False gets no
    gradient, and its gradient matmul is skipped.
    """
    _check_linear_dtypes(x, weight)
    if x.shape[-1:] != weight.shape[-1:] or weight.ndim != 2:
        raise ValueError(
            f"linear: input of shape {tuple(x.shape)} does not fit a weight of "
            f"shape {tuple(weight.shape)}; the weight must be (out_features, "
            "in_features) with in_features equal to the input's last axis."
        )
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(
            f"linear: bias dtype {bias.dtype} does not match weight dtype "
            f"{weight.dtype}; convert the bias with .astype({weight.dtype})."
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"linear: bias of shape {tuple(bias.shape)} does not fit a weight of "
            f"shape {tuple(weight.shape)}; it must be (out_features,)."
        )
    return LinearFunction.apply(x, weight, bias)


class LinearFunction(Function):
    """``x @ weight.T + bias`` as one record.

    One record instead of a transpose, a matrix product and an add, and the
    weight gradient comes out contiguous in the weight's own layout.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        need_x, need_weight, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if need_weight else None, weight if need_x else None)
        ctx.weight_shape = weight.shape
        if x.ndim > 2 and x.flags.c_contiguous:
            # One product over all rows instead of NumPy's one per leading index.
            rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
            out = matmul_arrays(rows, weight.T).reshape(x.shape[:-1] + weight.shape[:1])
        else:
            out = matmul_arrays(x, weight.T)
        if bias is not None:
            out += bias
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        xp = ctx.xp
        need_x, need_weight, need_bias = ctx.needs_input_grad
        out_features, in_features = ctx.weight_shape
        # Explicit row counts, because -1 is ambiguous for an empty last axis.
        count = math.prod(grad.shape[:-1])
        rows = xp.reshape(grad, (count, out_features))
        grad_x = None
        if need_x:
            grad_x = xp.reshape(matmul_arrays(rows, weight), grad.shape[:-1] + (in_features,))
        grad_weight = None
        if need_weight:
            grad_weight = matmul_arrays(xp.swapaxes(rows, 0, 1), xp.reshape(x, (count, in_features)))
        grad_bias = xp.sum(rows, axis=0) if need_bias else None
        return grad_x, grad_weight, grad_bias


# The Tensor method that converts to each float dtype.
_CAST_METHODS = {"float16": ".half()", "float32": ".float()", "float64": ".double()"}


def _check_linear_dtypes(x, weight):
    if x.dtype == weight.dtype:
        return
    cast = _CAST_METHODS.get(str(weight.dtype), f".astype({weight.dtype})")
    hint = f"Convert the input with {cast}"
    if str(x.dtype) in _CAST_METHODS:
        hint += f" or the layer with {_CAST_METHODS[str(x.dtype)]}"
    raise TypeError(
        f"linear: input dtype {x.dtype} does not match weight dtype "
        f"{weight.dtype} (input shape {tuple(x.shape)}, weight shape "
        f"{tuple(weight.shape)}). {hint}."
    )


class Linear(Module):
    """The affine map y = x W^T + b, with W of shape (out_features, in_features).

    Both the weight (kaiming_uniform_ with a = sqrt(5)) and the bias start
    from U(-1/sqrt(in_features), 1/sqrt(in_features)).

    >>> layer = gf.nn.Linear(4, 2)
    >>> layer(gf.randn(8, 4)).shape
    (8, 2)
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features = _check_size("Linear", "in_features", in_features)
        self.out_features = _check_size("Linear", "out_features", out_features)
        self.weight = Parameter(
            empty(out_features, in_features, device=device, dtype=dtype)
        )
        if bias:
            self.bias = Parameter(empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Draw new initial values for the weight and the bias."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return linear(x, self.weight, self.bias)

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


def _check_size(layer, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{layer}: {name} must be a non-negative int, got {value!r}")
    return value


class Identity(Module):
    """Return the input unchanged. Any constructor arguments are ignored."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


class Flatten(Module):
    """Flatten axes ``start_dim`` to ``end_dim`` into one (default: all but axis 0)."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def forward(self, x):
        return _ops.flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class ReLU(Module):
    """Apply relu elementwise."""

    def forward(self, x):
        return _ops.relu(x)


class LeakyReLU(Module):
    """Apply leaky_relu elementwise with slope ``negative_slope`` below 0."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return _ops.leaky_relu(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class GELU(Module):
    """Apply gelu elementwise, exact ("none", with erf) or with ``"tanh"``."""

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(
                f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}"
            )
        self.approximate = approximate

    def forward(self, x):
        return _ops.gelu(x, approximate=self.approximate)

    def extra_repr(self):
        return f"approximate='{self.approximate}'"


class Tanh(Module):
    """Apply tanh elementwise."""

    def forward(self, x):
        return _ops.tanh(x)


class Sigmoid(Module):
    """Apply the logistic sigmoid elementwise."""

    def forward(self, x):
        return _ops.sigmoid(x)


class SiLU(Module):
    """Apply silu (x * sigmoid(x)) elementwise."""

    def forward(self, x):
        return _ops.silu(x)


class Softplus(Module):
    """Apply softplus elementwise, linear where ``beta * x > threshold``."""

    def __init__(self, beta=1.0, threshold=20.0):
        super().__init__()
        self.beta = beta
        self.threshold = threshold

    def forward(self, x):
        return _ops.softplus(x, beta=self.beta, threshold=self.threshold)

    def extra_repr(self):
        return f"beta={self.beta}, threshold={self.threshold}"


class _AlongDim(Module):
    """Base of the modules that normalize along one axis, ``dim``."""

    def __init__(self, dim=-1):
        super().__init__()
        self.dim = dim

    def extra_repr(self):
        return f"dim={self.dim}"


class Softmax(_AlongDim):
    """Apply softmax along ``dim``."""

    def forward(self, x):
        return softmax(x, dim=self.dim)


class LogSoftmax(_AlongDim):
    """Apply log_softmax along ``dim``."""

    def forward(self, x):
        return log_softmax(x, dim=self.dim)


class Dropout(Module):
    """Zero elements with probability ``p`` in training, and pass all in eval."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = check_dropout_p("Dropout", p)

    def forward(self, x):
        return dropout(x, self.p, training=self.training)

    def extra_repr(self):
        return f"p={self.p}"


class _ModuleSequence(Module):
    """Base of the ordered containers: ``len``, iteration in order and ``append``.

    ``append`` names the new child ``str(len(self))``.
    """

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module):
        """Add ``module`` at the end and return self."""
        self.add_module(str(len(self)), module)
        return self


class Sequential(_ModuleSequence):
    """Run modules one after another, each on the previous one's output.

    Takes modules as arguments (named "0", "1", ...) or one dict of named
    modules. Supports indexing, slicing (a new Sequential sharing the
    modules), ``len``, iteration and ``append``.

    >>> model = gf.nn.Sequential(gf.nn.Linear(4, 8), gf.nn.ReLU(), gf.nn.Linear(8, 1))
    """

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], dict):
            for name, module in modules[0].items():
                self.add_module(name, module)
        else:
            for index, module in enumerate(modules):
                self.add_module(str(index), module)

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def __getitem__(self, index):
        if isinstance(index, slice):
            return type(self)(dict(list(self._modules.items())[index]))
        return list(self._modules.values())[_position(self, index)]

    def __setitem__(self, index, module):
        name = list(self._modules)[_position(self, index)]
        setattr(self, name, module)

    def __delitem__(self, index):
        if isinstance(index, slice):
            names = list(self._modules)[index]
        else:
            names = [list(self._modules)[_position(self, index)]]
        for name in names:
            del self._modules[name]
        # Renumber "0", "1", ... so that append() never reuses a name.
        modules = list(self._modules.values())
        self._modules.clear()
        for position, module in enumerate(modules):
            self._modules[str(position)] = module


def _position(container, index):
    """Return ``index`` (possibly negative) as a position in ``container``."""
    try:
        index = operator.index(index)
    except TypeError:
        raise TypeError(
            f"{type(container).__name__} indices must be ints or slices, got "
            f"{type(index).__name__}"
        ) from None
    size = len(container)
    if not -size <= index < size:
        raise IndexError(
            f"{type(container).__name__} index {index} is out of range for "
            f"{size} module(s)"
        )
    return index % size


class ModuleList(_ModuleSequence):
    """A list of modules whose parameters the parent module registers.

    It has no forward; index or iterate it inside the owner's forward.
    """

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return type(self)(list(self._modules.values())[index])
        return self._modules[str(_position(self, index))]

    def __setitem__(self, index, module):
        setattr(self, str(_position(self, index)), module)

    def __delitem__(self, index):
        modules = list(self._modules.values())
        if isinstance(index, slice):
            del modules[index]
        else:
            del modules[_position(self, index)]
        self._modules.clear()
        self.extend(modules)

    def extend(self, modules):
        """Append every module of the iterable ``modules`` and return self."""
        for module in modules:
            self.append(module)
        return self

    def insert(self, index, module):
        """Insert ``module`` before position ``index``."""
        modules = list(self._modules.values())
        modules.insert(index, module)
        self._modules.clear()
        self.extend(modules)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(
            "ModuleList has no forward(); iterate over it in the parent "
            "module's forward, or use gf.nn.Sequential to chain the modules."
        )


class ModuleDict(Module):
    """A dict of modules, by name, whose parameters the parent module registers."""

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, name):
        return self._modules[name]

    def __setitem__(self, name, module):
        self.add_module(name, module)

    def __delitem__(self, name):
        del self._modules[name]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def __contains__(self, name):
        return name in self._modules

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()

    def update(self, modules):
        """Add every (name, module) of a mapping or an iterable of pairs."""
        pairs = modules.items() if hasattr(modules, "items") else modules
        for name, module in pairs:
            self[name] = module

    def forward(self, *args, **kwargs):
        raise NotImplementedError(
            "ModuleDict has no forward(); look modules up by name in the "
            "parent module's forward."
        )
