"""``Module``, the base class of layers, and ``Parameter``, the tensors it trains.

A Module registers the Parameters, buffers and sub-Modules assigned to its
attributes, so that ``parameters()``, ``state_dict()``, ``to()`` and
``train()``/``eval()`` reach every one of them through the tree of modules.
"""

import collections
import collections.abc
import itertools

import numpy as np

from .. import _device
from .._tensor import Tensor, _parse_to_args, _to_array, make_tensor

__all__ = ["Module", "Parameter"]

_new_object = object.__new__


class Parameter(Tensor):
    """A leaf Tensor that a Module registers as one of its trainable weights.

    ``Parameter(data)`` shares the array of ``data`` (a Tensor or an array)
    without copying it. Assigning a Parameter to a Module attribute
    registers it, so ``module.parameters()`` yields it.

    >>> w = gf.nn.Parameter(gf.zeros(3))
    >>> w.requires_grad
    True
    """

    __slots__ = ()

    def __new__(cls, data=None, requires_grad=True):
        if data is None:
            data = np.empty((0,), dtype=np.float32)
        array = _to_array(data, None, None, copy=False)
        param = _new_object(cls)
        param.data = array
        param._grad_buffer = None
        param.grad = None
        param.grad_fn = None
        param._out_index = 0
        param._version = data._version if isinstance(data, Tensor) else [0]
        param._hooks = None
        param._view = None
        param._requires_grad = False
        if requires_grad:
            param.requires_grad = True
        return param

    def __init__(self, data=None, requires_grad=True):
        pass  # __new__ did all the work; Tensor.__init__ must not run again.

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


_IncompatibleKeys = collections.namedtuple(
    "IncompatibleKeys", ["missing_keys", "unexpected_keys"]
)


class Module:
    """Base class of every layer and model.

    Subclasses call ``super().__init__()`` first, assign their Parameters,
    buffers (``register_buffer``) and sub-Modules as attributes, and define
    ``forward``. Calling the module runs ``forward``.

    >>> class Affine(gf.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.scale = gf.nn.Parameter(gf.ones(3))
    ...     def forward(self, x):
    ...         return x * self.scale
    >>> Affine()(gf.ones(3)).shape
    (3,)
    """

    def __init__(self):
        setter = object.__setattr__
        setter(self, "training", True)
        setter(self, "_parameters", {})
        setter(self, "_buffers", {})
        setter(self, "_non_persistent_buffers", set())
        setter(self, "_modules", {})

    def forward(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} has no forward(); define "
            "forward(self, ...) in the subclass."
        )

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- registration ---------------------------------------------------

    def register_parameter(self, name, param):
        """Register ``param`` (a Parameter, or None for an absent one) as ``name``."""
        self._check_new_name("register_parameter", name, "_parameters")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"register_parameter: '{name}' must be a gf.nn.Parameter or "
                f"None, got {type(param).__name__}; wrap it as "
                "gf.nn.Parameter(tensor)."
            )
        self._parameters[name] = param

    def register_buffer(self, name, tensor, persistent=True):
        """Register ``tensor`` as a buffer: state that is saved but not trained.

        A non-persistent buffer follows ``to()`` but is left out of
        ``state_dict()``. ``tensor`` may be None for a buffer set later.
        """
        self._check_new_name("register_buffer", name, "_buffers")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(
                f"register_buffer: '{name}' must be a Tensor or None, got "
                f"{type(tensor).__name__}"
            )
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent_buffers.discard(name)
        else:
            self._non_persistent_buffers.add(name)

    def add_module(self, name, module):
        """Register ``module`` (a Module, or None) as the child ``name``."""
        self._check_new_name("add_module", name, "_modules")
        if module is not None and not isinstance(module, Module):
            raise TypeError(
                f"add_module: '{name}' must be a gf.nn.Module or None, got "
                f"{type(module).__name__}"
            )
        self._modules[name] = module

    register_module = add_module

    def _check_new_name(self, method, name, own_table):
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"{method} was called before Module.__init__(); call "
                "super().__init__() at the start of the subclass's __init__."
            )
        if not isinstance(name, str):
            raise TypeError(f"{method}: name must be a str, got {type(name).__name__}")
        if not name or "." in name:
            raise KeyError(
                f"{method}: name {name!r} must be non-empty and contain no '.'"
            )
        if hasattr(self, name) and name not in self.__dict__[own_table]:
            raise KeyError(
                f"{method}: attribute {name!r} already exists on "
                f"{type(self).__name__}; pick another name or delete it first."
            )

    def __setattr__(self, name, value):
        tables = self.__dict__.get("_parameters")
        if isinstance(value, (Parameter, Module)):
            kind, table = (("Parameter", "_parameters") if isinstance(value, Parameter)
                           else ("Module", "_modules"))
            if tables is None:
                raise AttributeError(
                    f"cannot assign a {kind} before Module.__init__(); call "
                    "super().__init__() first."
                )
            self._forget(name, keep=table)
            self.__dict__[table][name] = value
        elif tables is not None and name in self._parameters:
            self._assign_to_parameter(name, value)
        elif tables is not None and name in self._modules:
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} to '{name}', which "
                    "is a sub-Module; assign a Module or None."
                )
            self._modules[name] = None
        elif tables is not None and name in self._buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(
                    f"cannot assign {type(value).__name__} to the buffer "
                    f"'{name}'; assign a Tensor or None."
                )
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def _assign_to_parameter(self, name, value):
        if value is not None:
            raise TypeError(
                f"cannot assign {type(value).__name__} to '{name}', which is a "
                "Parameter; assign a gf.nn.Parameter or None."
            )
        self._parameters[name] = None

    def _forget(self, name, keep):
        """Remove ``name`` from the instance and every table except ``keep``.

        Keeping the entry in ``keep`` keeps its position, so replacing a
        registered value does not reorder ``state_dict()``.
        """
        self.__dict__.pop(name, None)
        for table in ("_parameters", "_buffers", "_modules"):
            if table != keep:
                self.__dict__[table].pop(name, None)
        self._non_persistent_buffers.discard(name)

    def __getattr__(self, name):
        # Called only when normal lookup fails, so registered names live here.
        state = self.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if table in state and name in state[table]:
                return state[table][name]
        raise AttributeError(
            f"'{type(self).__name__}' object has no attribute '{name}'"
        )

    def __delattr__(self, name):
        for table in ("_parameters", "_buffers", "_modules"):
            if name in self.__dict__.get(table, ()):
                del self.__dict__[table][name]
                self._non_persistent_buffers.discard(name)
                return
        object.__delattr__(self, name)

    def __dir__(self):
        names = set(super().__dir__())
        for table in ("_parameters", "_buffers", "_modules"):
            names.update(self.__dict__[table])
        return sorted(names)

    # -- traversal ------------------------------------------------------

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        """Yield ``(dotted_name, module)`` for this module and every descendant."""
        if memo is None:
            memo = set()
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is None:
                continue
            child_prefix = f"{prefix}.{name}" if prefix else name
            yield from child.named_modules(memo, child_prefix, remove_duplicate)

    def modules(self):
        """Yield this module and every descendant, each once."""
        for _, module in self.named_modules():
            yield module

    def named_children(self):
        """Yield ``(name, module)`` for each direct child, each module once."""
        seen = set()
        for name, child in self._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                yield name, child

    def children(self):
        """Yield each direct child module once."""
        for _, child in self.named_children():
            yield child

    def _named_members(self, table, prefix, recurse, remove_duplicate=True):
        modules = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        seen = set()
        for module_prefix, module in modules:
            for name, value in module.__dict__[table].items():
                if value is None or (remove_duplicate and id(value) in seen):
                    continue
                seen.add(id(value))
                yield (f"{module_prefix}.{name}" if module_prefix else name), value

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        """Yield ``(dotted_name, parameter)``, each shared parameter once."""
        yield from self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse=True):
        """Yield every parameter of this module (and its descendants) once."""
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    def named_buffers(self, prefix="", recurse=True, remove_duplicate=True):
        """Yield ``(dotted_name, buffer)``, persistent or not."""
        yield from self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse=True):
        """Yield every buffer of this module (and its descendants) once."""
        for _, buffer in self.named_buffers(recurse=recurse):
            yield buffer

    def get_submodule(self, target):
        """Return the descendant at the dotted path ``target`` ("" is self)."""
        module = self
        if not target:
            return module
        for part in target.split("."):
            child = module._modules.get(part)
            if child is None:
                raise AttributeError(
                    f"get_submodule: {type(module).__name__} has no sub-Module "
                    f"'{part}' (path {target!r})"
                )
            module = child
        return module

    def apply(self, fn):
        """Call ``fn(module)`` on every descendant, children first, then self."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # -- modes and gradients -------------------------------------------

    def train(self, mode=True):
        """Set training mode (``mode=True``) or evaluation mode on every module."""
        if not isinstance(mode, bool):
            raise TypeError(f"train: mode must be a bool, got {type(mode).__name__}")
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self):
        """Set evaluation mode, as ``train(False)`` does."""
        return self.train(False)

    def requires_grad_(self, requires_grad=True):
        """Set ``requires_grad`` on every parameter (False freezes the module)."""
        for param in self.parameters():
            param.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none=True):
        """Reset the gradient of every parameter to None, or to zeros in place."""
        for param in self.parameters():
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.grad_fn = None
                param.grad._requires_grad = False
                param.grad.data[...] = 0

    # -- device and dtype ----------------------------------------------

    def to(self, *args, **kwargs):
        """Move and/or cast every parameter and buffer in place, and return self.

        Accepts ``to(device)``, ``to(dtype)``, ``to(device, dtype)``, a Tensor
        (its device and dtype), and the keywords ``device=`` and ``dtype=``.
        A dtype applies to floating-point parameters and buffers only. The
        Parameter objects stay the same, so an optimizer built before the
        call still updates them.
        """
        target_device, dtype = _parse_to_args(args, dict(kwargs))
        if dtype is not None:
            dtype = np.dtype(dtype)
            if dtype.kind != "f":
                raise TypeError(
                    f"Module.to: dtype must be a floating-point dtype, got "
                    f"{dtype}; integer buffers keep their dtype on their own."
                )
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            _convert_in_place(tensor, target_device, dtype)
            grad = tensor.grad
            if grad is None:
                continue
            if tensor._grad_buffer is None:
                _convert_in_place(grad, target_device, dtype)
                continue
            # A gradient in a GradientBuffer is a view of the buffer, so a
            # converted copy replaces it and the buffer no longer counts it.
            converted = make_tensor(grad.data)
            _convert_in_place(converted, target_device, dtype)
            if converted.data is not grad.data:
                tensor.grad = converted
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        return self.to("cuda" if device is None else f"cuda:{int(device)}")

    def float(self):
        return self.to(np.float32)

    def double(self):
        return self.to(np.float64)

    def half(self):
        return self.to(np.float16)

    # -- state_dict -----------------------------------------------------

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """Return an ordered dict from dotted names to parameters and buffers.

        The values are detached Tensors that share memory with the module's
        (the parameters themselves with ``keep_vars=True``). Non-persistent
        buffers are left out, and a parameter shared by two modules appears
        under both names.
        """
        if destination is None:
            destination = collections.OrderedDict()
        for name, value in self._state_items(prefix):
            destination[name] = value if keep_vars else value.detach()
        return destination

    def _state_items(self, prefix=""):
        for module_prefix, module in self.named_modules(prefix=prefix,
                                                        remove_duplicate=False):
            dotted = f"{module_prefix}." if module_prefix else ""
            for name, param in module._parameters.items():
                if param is not None:
                    yield dotted + name, param
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in module._non_persistent_buffers:
                    yield dotted + name, buffer

    def load_state_dict(self, state_dict, strict=True):
        """Copy the values of ``state_dict`` into the parameters and buffers.

        Every key is checked before anything changes. A shape mismatch always
        raises a RuntimeError. With ``strict=True`` missing and unexpected
        keys raise too, all listed in one message. With ``strict=False`` they
        are returned as ``(missing_keys, unexpected_keys)``. Values are cast
        to the target's dtype and copied onto the target's device.
        """
        if not isinstance(state_dict, collections.abc.Mapping):
            raise TypeError(
                "load_state_dict expects a mapping from names to tensors, got "
                f"{type(state_dict).__name__}"
            )
        targets = dict(self._state_items())
        missing = [key for key in targets if key not in state_dict]
        unexpected = [key for key in state_dict if key not in targets]
        arrays, problems = _check_loaded_values(targets, state_dict)
        if strict:
            problems = _key_problems(missing, unexpected) + problems
        if problems:
            raise RuntimeError(
                f"load_state_dict into {type(self).__name__} failed, and "
                "nothing was changed:\n  " + "\n  ".join(problems)
            )
        for key, array in arrays.items():
            _copy_into(targets[key], array)
        return _IncompatibleKeys(missing, unexpected)

    # -- printing -------------------------------------------------------

    def extra_repr(self):
        """Return the text that ``repr`` shows inside this module's brackets."""
        return ""

    def __repr__(self):
        lines = []
        extra = self.extra_repr()
        if extra:
            lines.extend(extra.split("\n"))
        for name, child in self._modules.items():
            child_text = repr(child).replace("\n", "\n  ")
            lines.append(f"({name}): {child_text}")
        name = type(self).__name__
        if not lines:
            return f"{name}()"
        if len(lines) == 1 and not self._modules:
            return f"{name}({lines[0]})"
        return f"{name}(\n  " + "\n  ".join(lines) + "\n)"


def _convert_in_place(tensor, target_device, dtype):
    array = tensor.data
    if dtype is not None and array.dtype.kind == "f" and array.dtype != dtype:
        array = array.astype(dtype)
    if target_device is not None and _device.device_of_array(array) != target_device:
        array = _to_array(array, None, target_device, copy=False)
    tensor.data = array


def _check_loaded_values(targets, state_dict):
    """Return ({key: array ready to copy}, [shape and type problems])."""
    arrays = {}
    problems = []
    for key, target in targets.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if isinstance(value, Tensor):
            value = value.data
        elif not hasattr(value, "shape") or not hasattr(value, "dtype"):
            problems.append(
                f"'{key}': expected a Tensor or an array, got {type(value).__name__}"
            )
            continue
        if tuple(value.shape) != tuple(target.shape):
            problems.append(
                f"'{key}': shape {tuple(value.shape)} in the state_dict does not "
                f"match shape {tuple(target.shape)} in the module"
            )
            continue
        arrays[key] = value
    return arrays, problems


def _key_problems(missing, unexpected):
    problems = []
    if missing:
        problems.append("missing key(s): " + ", ".join(repr(k) for k in missing))
    if unexpected:
        problems.append("unexpected key(s): " + ", ".join(repr(k) for k in unexpected))
    return problems


def _copy_into(target, array):
    """Copy ``array`` into ``target``'s own array, onto its device and dtype."""
    converted = _to_array(array, target.data.dtype, target.device, copy=False)
    xp = _device.array_module(target.data)
    xp.copyto(target.data, converted)
    target._version[0] += 1
