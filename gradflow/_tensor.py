"""The Tensor: an array (NumPy or CuPy) plus what autograd needs to know of it."""

import numbers

import numpy as np

from . import _device, _fastpath, _views
from .autograd import _engine, _function, _grad_mode, _namespace
from .errors import GraphError

__all__ = ["Tensor", "make_tensor", "tensor", "as_tensor", "from_numpy", "from_dlpack"]

_FLOAT_KINDS = "f"
_DEFAULT_FLOAT = np.dtype(np.float32)


class Tensor:
    """An n-dimensional array that records operations for reverse-mode autograd.

    ``data`` is the NumPy or CuPy array; ``grad`` is a Tensor (or None) that
    backward fills; ``grad_fn`` is the tape record that produced this tensor
    (None for leaves). Create tensors with ``gf.tensor``, the factories
    (``gf.zeros``, ``gf.randn``, ...) or ``Tensor(array)``, which wraps an
    array without copying it.
    """

    __slots__ = (
        "data", "_grad", "grad_fn", "_out_index", "_requires_grad", "_version",
        "_hooks", "_view", "_grad_buffer", "__weakref__",
    )
    # NumPy defers to Tensor's reflected operators (array * tensor).
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, data, dtype=None, device=None, requires_grad=False):
        array = _to_array(data, dtype, device, copy=False)
        self.data = array
        self._grad = None
        self.grad_fn = None
        self._out_index = 0
        self._version = [0]
        self._hooks = None
        self._view = None
        self._grad_buffer = None
        self._requires_grad = False
        if requires_grad:
            self.requires_grad = True

    # -- metadata -------------------------------------------------------

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self):
        return _device.device_of_array(self.data)

    @property
    def grad(self):
        """The gradient that backward accumulated here (a Tensor), or None."""
        return self._grad

    @grad.setter
    def grad(self, value):
        if value is not None:
            _check_grad_assignment(self, value)
            if (value.grad_fn is not None or value._view is not None
                    or value._grad is not None or value._hooks
                    or _takes_attributes(value)):
                # A gradient with a graph, a view whose base may carry one,
                # or a subclass instance that can be given attributes can
                # refer back to this tensor.
                _fastpath.track_records()
        if self._grad_buffer is not None:
            self._grad_buffer._note_assignment(self, value)
        self._grad = value

    @property
    def is_leaf(self):
        return self.grad_fn is None

    @property
    def is_cuda(self):
        return not isinstance(self.data, np.ndarray)

    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value):
        value = bool(value)
        if self.grad_fn is not None and not value:
            raise GraphError(
                "requires_grad can only be turned off on a leaf tensor; this "
                f"one was produced by '{self.grad_fn.name}'. Use .detach() to "
                "get a tensor that is cut off from the graph."
            )
        if value and self.data.dtype.kind not in _FLOAT_KINDS:
            raise TypeError(
                f"requires_grad=True needs a floating-point tensor, but this "
                f"one has dtype {self.data.dtype}. Convert it first, e.g. "
                "t.float() or gf.tensor(data, dtype=gf.float32)."
            )
        self._requires_grad = value

    @property
    def T(self):
        return self.permute(tuple(range(self.ndim - 1, -1, -1)))

    @property
    def mT(self):
        return self.transpose(-2, -1)

    @property
    def itemsize(self):
        return self.data.itemsize

    @property
    def nbytes(self):
        return self.data.nbytes

    def size(self, dim=None):
        """Return the shape, or the length of axis ``dim``."""
        if dim is None:
            return self.data.shape
        from ._ops._common import normalize_axes

        if self.ndim == 0:
            raise IndexError("size: a 0-d tensor has no axes; call size() without dim")
        return self.data.shape[normalize_axes("size", dim, self.ndim)[0]]

    def numel(self):
        return int(self.data.size)

    def dim(self):
        return self.data.ndim

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor is undefined")
        return self.data.shape[0]

    # -- conversion -----------------------------------------------------

    def item(self):
        """Return the single value of a one-element tensor as a Python number."""
        if self.data.size != 1:
            raise ValueError(
                f"item() needs a tensor with exactly one element, got shape "
                f"{tuple(self.shape)}; index or reduce it first."
            )
        return self.data.reshape(()).item()

    def tolist(self):
        return _host(self.data).tolist()

    def numpy(self):
        """Return the NumPy array of a CPU tensor (shared, not copied)."""
        if self._requires_grad:
            raise RuntimeError(
                "numpy() on a tensor that requires grad would let changes to "
                "the array bypass autograd; call t.detach().numpy() instead."
            )
        if not isinstance(self.data, np.ndarray):
            raise TypeError(
                f"numpy() needs a CPU tensor, but this one is on {self.device}; "
                "call t.cpu().numpy() to copy it to the host first."
            )
        return self.data

    def __array__(self, dtype=None, copy=None):
        if not isinstance(self.data, np.ndarray):
            raise TypeError(
                f"cannot convert a tensor on {self.device} to a NumPy array "
                "implicitly; call t.cpu().numpy() to copy it to the host."
            )
        array = self.data if dtype is None else self.data.astype(dtype, copy=False)
        return array.copy() if copy else array

    def __dlpack__(self, **kwargs):
        if self._requires_grad:
            raise RuntimeError(
                "cannot export a tensor that requires grad through DLPack, "
                "because the consumer could change it behind autograd's back; "
                "export t.detach() instead."
            )
        return self.data.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    def to(self, *args, **kwargs):
        """Return this tensor on another device and/or with another dtype.

        Accepts ``to(device)``, ``to(dtype)``, ``to(device, dtype)`` and the
        keywords ``device=`` and ``dtype=``. Returns ``self`` when nothing
        changes; a device move is differentiable, as is a float dtype cast.
        """
        device, dtype = _parse_to_args(args, kwargs)
        out = self
        if dtype is not None and np.dtype(dtype) != self.dtype:
            out = out.astype(dtype)
        if device is not None and device != out.device:
            from ._ops._shape import ToDevice

            out = ToDevice.apply(out, device)
        return out

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        return self.to("cuda" if device is None else f"cuda:{int(device)}")

    def astype(self, dtype):
        from ._ops._shape import cast

        return cast(self, dtype)

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)

    def half(self):
        return self.astype(np.float16)

    def long(self):
        return self.astype(np.int64)

    def int(self):
        return self.astype(np.int32)

    def bool(self):
        return self.astype(np.bool_)

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __bool__(self):
        if self.data.size != 1:
            raise ValueError(
                f"the truth value of a tensor of shape {tuple(self.shape)} is "
                "ambiguous; use .any() or .all()."
            )
        return bool(self.item())

    def __index__(self):
        if self.data.dtype.kind not in "iub" or self.data.size != 1:
            raise TypeError("only integer tensors of one element can be used as an index")
        return int(self.item())

    # -- autograd -------------------------------------------------------

    def detach(self):
        """Return a tensor that shares this one's array but not its graph."""
        out = make_tensor(self.data)
        out._version = self._version
        return out

    def detach_(self):
        self.grad_fn = None
        self._requires_grad = False
        return self

    def requires_grad_(self, requires_grad=True):
        self.requires_grad = requires_grad
        return self

    def clone(self):
        from ._ops._shape import clone

        return clone(self)

    def retain_grad(self):
        """Keep ``.grad`` on this non-leaf tensor after backward."""
        if self.grad_fn is None:
            if not self._requires_grad:
                raise GraphError(
                    "retain_grad() on a tensor that does not require grad has "
                    "no effect; set requires_grad=True on the inputs first."
                )
            return
        import weakref

        record = self.grad_fn
        if record._retained is None:
            record._retained = {}
        record._retained[self._out_index] = weakref.ref(self)

    @property
    def retains_grad(self):
        record = self.grad_fn
        return bool(record and record._retained and self._out_index in record._retained)

    def register_hook(self, hook):
        """Call ``hook(grad)`` when this tensor's gradient is computed.

        The hook may return a replacement gradient. Returns a handle whose
        ``remove()`` unregisters the hook.
        """
        if not self._requires_grad:
            raise GraphError(
                "register_hook() needs a tensor that requires grad; this one "
                "never receives a gradient."
            )
        # The hook's closure may refer to tensors computed from this one.
        _fastpath.track_records()
        if self.grad_fn is None:
            if self._hooks is None:
                self._hooks = []
            hooks = self._hooks
        else:
            record = self.grad_fn
            if record._hooks is None:
                record._hooks = {}
            hooks = record._hooks.setdefault(self._out_index, [])
        hooks.append(hook)
        return _HookHandle(hooks, hook)

    def backward(self, gradient=None, retain_graph=None, create_graph=False,
                 inputs=None):
        """Accumulate the gradient of this tensor into ``.grad`` of the leaves.

        ``gradient`` is required unless this tensor has one element. With
        ``inputs``, only those leaves receive a gradient.
        """
        if not self._requires_grad:
            raise GraphError(
                "backward() on a tensor that does not require grad: no input "
                "of the computation had requires_grad=True, or it ran under "
                "gf.no_grad()."
            )
        grad = _root_gradient(self, gradient, create_graph, "backward()")
        if inputs is not None:
            inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
            grads = _engine.run_backward(
                [self], [grad], retain_graph, create_graph, inputs=inputs,
                allow_unused=True,
            )
            for leaf, g in zip(inputs, grads):
                if g is not None:
                    _engine._accumulate_into(leaf, g, detach=not create_graph)
            return
        _engine.run_backward([self], [grad], retain_graph, create_graph)

    # -- printing -------------------------------------------------------

    def __repr__(self):
        body = np.array2string(
            _host(self.data), separator=", ", prefix="tensor(", threshold=200
        )
        extras = []
        if self.device.type != "cpu":
            extras.append(f"device='{self.device}'")
        if self.dtype != _DEFAULT_FLOAT and self.dtype.kind == "f" or self.data.size == 0:
            extras.append(f"dtype={self.dtype}")
        if self.grad_fn is not None:
            extras.append(f"grad_fn=<{self.grad_fn.name}>")
        elif self._requires_grad:
            extras.append("requires_grad=True")
        return "tensor(" + ", ".join([body] + extras) + ")"

    def __hash__(self):
        return id(self)

    def __deepcopy__(self, memo):
        """Copy a leaf tensor's array (and its gradient); a Parameter stays one."""
        if self.grad_fn is not None:
            raise GraphError(
                "only leaf tensors can be deep-copied; this one was produced by "
                f"'{self.grad_fn.name}'. Deep-copy t.detach() instead."
            )
        import copy

        copied = _new_tensor(type(self))
        copied.data = self.data.copy()
        # The copy's gradient is its own array, outside any GradientBuffer.
        copied._grad_buffer = None
        copied.grad = None if self.grad is None else copy.deepcopy(self.grad, memo)
        copied.grad_fn = None
        copied._out_index = 0
        copied._requires_grad = self._requires_grad
        copied._version = [0]
        copied._hooks = None
        copied._view = None
        memo[id(self)] = copied
        return copied

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "gradflow tensors are not picklable; save them with gf.save(), "
            "which writes the safetensors format."
        )


class _HookHandle:
    __slots__ = ("_hooks", "_hook")

    def __init__(self, hooks, hook):
        self._hooks = hooks
        self._hook = hook

    def remove(self):
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


_new_tensor = object.__new__


def make_tensor(data, grad_fn=None, out_index=0):
    """Wrap an array in a Tensor without checks (the ops' fast path)."""
    if not isinstance(data, np.ndarray) and (
        isinstance(data, (np.generic, numbers.Number))
    ):
        data = np.asarray(data)
    t = _new_tensor(Tensor)
    t.data = data
    t._grad = None
    t.grad_fn = grad_fn
    t._out_index = out_index
    t._requires_grad = grad_fn is not None
    t._version = [0]
    t._hooks = None
    t._view = None
    t._grad_buffer = None
    return t


def _takes_attributes(t):
    """Return whether ``t`` is a Tensor subclass instance that can be given attributes."""
    cls = type(t)
    return cls is not Tensor and (
        hasattr(t, "__dict__") or cls.__basicsize__ != Tensor.__basicsize__
    )


def _check_grad_assignment(t, value):
    if value is t:
        raise ValueError("a tensor cannot be its own gradient; assign a copy (t.clone()).")
    if not isinstance(value, Tensor):
        raise TypeError(
            f"a gradient must be a Tensor or None, got {type(value).__name__}; "
            "wrap arrays with gf.tensor()."
        )
    if value.data.shape != t.data.shape:
        raise ValueError(
            f"the assigned gradient has shape {tuple(value.shape)} but the "
            f"tensor has shape {tuple(t.shape)}; they must match."
        )
    if value.data.dtype != t.data.dtype:
        raise TypeError(
            f"the assigned gradient has dtype {value.dtype} but the tensor has "
            f"dtype {t.dtype}; convert it with .astype({t.dtype})."
        )
    # Two NumPy arrays are both on the CPU; only other kinds need .device.
    if type(value.data) is not type(t.data) or (
        type(t.data) is not np.ndarray and value.device != t.device
    ):
        raise RuntimeError(
            f"the assigned gradient is on {value.device} but the tensor is on "
            f"{t.device}; move it with .to() first."
        )


def _host(array):
    return array if isinstance(array, np.ndarray) else array.get()


def _parse_to_args(args, kwargs):
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    if kwargs:
        raise TypeError(f"to() got unexpected keyword(s) {sorted(kwargs)}")
    for arg in args:
        if isinstance(arg, (str, _device.Device)):
            device = arg
        elif isinstance(arg, Tensor):
            device, dtype = arg.device, arg.dtype
        else:
            dtype = arg
    return (None if device is None else _device.device(device)), dtype


def _root_gradient(root, gradient, create_graph, where, keyword="gradient"):
    if gradient is None:
        if root.data.size != 1:
            raise GraphError(
                f"{where} of a tensor of shape {tuple(root.shape)} needs a "
                f"'{keyword}' argument of that shape, because an implicit "
                "gradient exists only for one-element outputs. Reduce it first "
                f"(e.g. loss.sum() or loss.mean()) or pass {keyword}=."
            )
        xp = _device.array_module(root.data)
        grad = xp.ones(root.shape, dtype=root.dtype)
        return make_tensor(grad) if create_graph else grad
    if not isinstance(gradient, Tensor):
        gradient = Tensor(gradient, dtype=root.dtype, device=root.device)
    if gradient.shape != root.shape:
        raise GraphError(
            f"{where}: 'gradient' has shape {tuple(gradient.shape)} but the "
            f"tensor has shape {tuple(root.shape)}; they must match."
        )
    if gradient.device != root.device:
        raise RuntimeError(
            f"{where}: 'gradient' is on {gradient.device} but the tensor is on "
            f"{root.device}; move one with .to()."
        )
    if gradient.dtype != root.dtype:
        gradient = gradient.astype(root.dtype)
    return gradient if create_graph else gradient.data


def _to_array(data, dtype, device, copy):
    """Convert ``data`` to an array of ``dtype`` on ``device``.

    With ``device`` None the data stays where it is; a device given
    explicitly is the caller's request, so the one copy it needs is made.
    """
    if isinstance(data, Tensor):
        data = data.data
    dtype = None if dtype is None else _parse_dtype(dtype)
    on_gpu = hasattr(data, "__cuda_array_interface__") and not isinstance(data, np.ndarray)
    if device is not None:
        target = _device.device(device)
    elif on_gpu:
        target = _device.device_of_array(data)
    else:
        target = _device.CPU
    if not hasattr(data, "dtype"):
        # Python numbers and (nested) lists: floats default to float32.
        data = np.asarray(data)
        if dtype is None and data.dtype.kind == "f":
            dtype = _DEFAULT_FLOAT
        copy = False
    if target.type == "cpu":
        if on_gpu:
            data = data.get()
            copy = False
        return np.array(data, dtype=dtype) if copy else np.asarray(data, dtype=dtype)
    cupy = target.xp
    with target:
        if copy:
            return cupy.array(data, dtype=dtype)
        return cupy.asarray(data, dtype=dtype)


def _parse_dtype(dtype):
    try:
        return np.dtype(dtype)
    except TypeError:
        raise TypeError(f"invalid dtype {dtype!r}; use e.g. gf.float32") from None


def tensor(data, dtype=None, device=None, requires_grad=False):
    """Create a leaf Tensor from data, copying it.

    Python floats become float32 and Python ints int64; arrays keep their
    dtype unless ``dtype`` is given.

    >>> x = gf.tensor([[1.0, 2.0]], requires_grad=True)
    """
    array = _to_array(data, dtype, device, copy=True)
    out = make_tensor(array)
    if requires_grad:
        out.requires_grad = True
    return out


def as_tensor(data, dtype=None, device=None):
    """Create a Tensor sharing ``data``'s memory where dtype and device allow."""
    if isinstance(data, Tensor) and dtype is None and device is None:
        return data
    return make_tensor(_to_array(data, dtype, device, copy=False))


def from_numpy(array):
    """Wrap a NumPy array in a CPU Tensor that shares its memory."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"from_numpy expects a numpy.ndarray, got {type(array).__name__}")
    return make_tensor(array)


def from_dlpack(obj):
    """Wrap any DLPack producer (a PyTorch, CuPy or JAX array) without copying."""
    device_type, device_id = obj.__dlpack_device__()
    if int(device_type) == 1:  # kDLCPU
        return make_tensor(np.from_dlpack(obj))
    cupy = _device.device(f"cuda:{int(device_id)}").xp
    return make_tensor(cupy.from_dlpack(obj))


def _check_devices(function, tensors):
    first = type(tensors[0].data)
    for t in tensors[1:]:
        if type(t.data) is not first:
            break
    else:
        if first is np.ndarray:
            return
        ids = {t.data.device.id for t in tensors}
        if len(ids) == 1:
            return
    devices = ", ".join(
        f"{t.device} ({tuple(t.shape)}, {t.dtype})" for t in tensors
    )
    raise RuntimeError(
        f"{function.__name__}: expected all tensors on one device, got {devices}. "
        "gradflow never copies between devices implicitly; move them with "
        ".to(device) first."
    )


_function.Tensor = Tensor
_function.make_tensor = make_tensor
_function.check_devices = _check_devices
_function.refresh_view = _views.refresh
_engine.Tensor = Tensor
_engine.make_tensor = make_tensor
_engine.tensor_namespace = _namespace.tensor_namespace
_engine.array_namespace = _namespace.array_namespace
