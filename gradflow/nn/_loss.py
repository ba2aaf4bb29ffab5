"""Loss functions: squared error, binary and categorical cross-entropy.

Every loss validates its inputs before computing: matching shapes, float or
integer targets where each is expected, class indices in range, and a
``reduction`` of "none", "mean" or "sum". Checks of values (class-index
range, probabilities in [0, 1]) read a reduced scalar back to the host, so
on CUDA each costs one device synchronization.
"""

import numbers

import numpy as np

from .. import _ops
from .._device import array_module
from .._tensor import Tensor, make_tensor, tensor
from ..autograd import Function
from ._module import Module
from ._softmax import log_softmax

__all__ = [
    "mse_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "nll_loss", "cross_entropy", "one_hot", "MSELoss", "BCELoss",
    "BCEWithLogitsLoss", "NLLLoss", "CrossEntropyLoss",
]

_REDUCTIONS = ("none", "mean", "sum")
# PyTorch's binary cross-entropy clamps each log term at -100, so a
# prediction of exactly 0 or 1 costs at most 100 instead of infinity.
_LOG_FLOOR = -100.0
# Lower bound on x * (1 - x) in the BCE gradient, so it stays finite at 0 and 1.
_BCE_GRAD_EPS = 1e-12


# -- shared checks ------------------------------------------------------


def _as_tensor(op, name, value):
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (numbers.Number, list, tuple)) or hasattr(value, "dtype"):
        return tensor(value)
    raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")


def _check_reduction(op, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}"
        )


def _check_float(op, name, t):
    if t.dtype.kind != "f":
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype} "
            f"(shape {tuple(t.shape)}); convert it with .float() or .double()."
        )


def _check_same_shape(op, input, target):
    if input.shape != target.shape:
        raise ValueError(
            f"{op}: target shape {tuple(target.shape)} does not match input "
            f"shape {tuple(input.shape)}; they must be equal (gradflow's losses "
            "do not broadcast)."
        )


def _check_device(op, name, t, input):
    if t.device != input.device:
        raise RuntimeError(
            f"{op}: {name} is on {t.device} but input is on {input.device}; "
            "move it with .to(input.device)."
        )


def _elementwise_checks(op, input, target, reduction):
    """Convert and check the arguments of a loss between two float tensors of one shape."""
    input, target = _as_tensor(op, "input", input), _as_tensor(op, "target", target)
    _check_reduction(op, reduction)
    _check_float(op, "input", input)
    _check_float(op, "target", target)
    _check_same_shape(op, input, target)
    _check_device(op, "target", target, input)
    return input, target


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _all_in_unit_interval(t):
    xp = array_module(t.data)
    # NaN fails both comparisons, so it is rejected too.
    return bool(xp.all((t.data >= 0) & (t.data <= 1)))


def _first_outside_unit_interval(t):
    # Only called once the check has failed, so the host copy costs nothing
    # on the normal path.
    values = t.data if isinstance(t.data, np.ndarray) else t.data.get()
    bad = ~((values >= 0) & (values <= 1))
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return index, values[index].item()


# -- regression and binary losses --------------------------------------


def mse_loss(input, target, reduction="mean"):
    """Return the squared error (input - target)^2, reduced by ``reduction``.

    ``input`` and ``target`` are float tensors of one shape; ``target`` may
    require grad too.

    >>> F.mse_loss(gf.tensor([1.0, 2.0]), gf.tensor([1.0, 4.0]))
    tensor(2.)
    """
    op = "mse_loss"
    input, target = _elementwise_checks(op, input, target, reduction)
    diff = input - target
    return _reduce(diff * diff, reduction)


class BinaryCrossEntropy(Function):
    """-(t log x + (1 - t) log(1 - x)) elementwise, each log clamped at -100."""

    @staticmethod
    def forward(ctx, x, t):
        log_x, log_1mx = _clamped_logs(array_module(x), x)
        ctx.save_for_backward(x, t)
        return -(t * log_x + (1 - t) * log_1mx)

    @staticmethod
    def backward(ctx, grad):
        x, t = ctx.saved_tensors
        xp = ctx.xp
        need_x, need_t = ctx.needs_input_grad
        grad_x = grad_t = None
        if need_x:
            # NOTE: the exact derivative (x - t) / (x (1 - x)) is infinite at
            # x = 0 and x = 1, so its denominator is floored as PyTorch does.
            grad_x = grad * (x - t) / xp.maximum(x * (1 - x), _BCE_GRAD_EPS)
        if need_t:
            log_x, log_1mx = _clamped_logs(xp, x)
            grad_t = grad * (log_1mx - log_x)
        return grad_x, grad_t


def _clamped_logs(xp, x):
    """Return log(x) and log(1 - x), each at least -100."""
    # log(0) = -inf is expected here and the clamp removes it, so NumPy's
    # divide-by-zero warning is silenced.
    with np.errstate(divide="ignore"):
        log_x = xp.maximum(xp.log(x), _LOG_FLOOR)
        log_1mx = xp.maximum(xp.log(1 - x), _LOG_FLOOR)
    return log_x, log_1mx


def binary_cross_entropy(input, target, weight=None, reduction="mean"):
    """Return the binary cross-entropy of probabilities ``input`` against ``target``.

    Both are float tensors of one shape with every value in [0, 1] (checked
    on the host). Each log term is clamped at -100. ``weight`` multiplies the
    elementwise loss and broadcasts to the input's shape.

    >>> F.binary_cross_entropy(gf.tensor([0.5]), gf.tensor([1.0]))
    tensor(0.6931472)
    """
    op = "binary_cross_entropy"
    input, target = _elementwise_checks(op, input, target, reduction)
    for name, t in (("input", input), ("target", target)):
        if not _all_in_unit_interval(t):
            index, value = _first_outside_unit_interval(t)
            raise ValueError(
                f"{op}: every {name} value must be in [0, 1], but {name}"
                f"[{', '.join(map(str, index))}] is {value} (shape "
                f"{tuple(t.shape)}). For raw scores (logits) use "
                "binary_cross_entropy_with_logits, or apply sigmoid first."
            )
    loss = BinaryCrossEntropy.apply(input, target)
    loss = _apply_weight(op, "weight", loss, weight, input)
    return _reduce(loss, reduction)


def _apply_weight(op, name, loss, weight, input):
    if weight is None:
        return loss
    weight = _as_tensor(op, name, weight)
    _check_float(op, name, weight)
    _check_device(op, name, weight, input)
    try:
        _broadcast_to_input(weight.shape, input.shape)
    except ValueError:
        raise ValueError(
            f"{op}: {name} of shape {tuple(weight.shape)} does not broadcast to "
            f"the input shape {tuple(input.shape)}"
        ) from None
    return loss * weight


def _broadcast_to_input(shape, input_shape):
    if np.broadcast_shapes(shape, input_shape) != tuple(input_shape):
        raise ValueError("broadcast changes the input shape")


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean",
                                     pos_weight=None):
    """Return the binary cross-entropy of ``sigmoid(input)``, computed stably.

    The loss is (1 - t) x + (1 + (p - 1) t) softplus(-x) with p the
    ``pos_weight``, which weights the positive term and broadcasts along the
    last (class) axis. ``weight`` multiplies the elementwise loss. Both may
    require grad, as may ``target``.

    >>> F.binary_cross_entropy_with_logits(gf.tensor([0.0]), gf.tensor([1.0]))
    tensor(0.6931472)
    """
    op = "binary_cross_entropy_with_logits"
    input, target = _elementwise_checks(op, input, target, reduction)
    # softplus(-x) = log(1 + exp(-x)) = -log(sigmoid(x)). An infinite
    # threshold keeps the exact formula, which never overflows.
    neg_log_sigmoid = _ops.softplus(-input, threshold=float("inf"))
    if pos_weight is None:
        loss = (1 - target) * input + neg_log_sigmoid
    else:
        pos_weight = _as_tensor(op, "pos_weight", pos_weight)
        _check_pos_weight(op, pos_weight, input)
        coefficient = 1 + (pos_weight - 1) * target
        loss = (1 - target) * input + coefficient * neg_log_sigmoid
    loss = _apply_weight(op, "weight", loss, weight, input)
    return _reduce(loss, reduction)


def _check_pos_weight(op, pos_weight, input):
    _check_float(op, "pos_weight", pos_weight)
    _check_device(op, "pos_weight", pos_weight, input)
    try:
        _broadcast_to_input(pos_weight.shape, input.shape)
    except ValueError:
        raise ValueError(
            f"{op}: pos_weight of shape {tuple(pos_weight.shape)} does not "
            f"broadcast to the input shape {tuple(input.shape)}; give one "
            "weight per class, of shape (C,)."
        ) from None


# -- class-index losses -------------------------------------------------


def one_hot(indices, num_classes=-1):
    """Return the int64 one-hot encoding of ``indices``, with a new last axis.

    ``num_classes=-1`` uses max(indices) + 1. A negative index, or one not
    below ``num_classes``, raises an IndexError.

    >>> F.one_hot(gf.tensor([0, 2]), num_classes=3)
    tensor([[1, 0, 0],
            [0, 0, 1]])
    """
    indices = _as_tensor("one_hot", "indices", indices)
    if indices.dtype.kind not in "iu":
        raise TypeError(
            f"one_hot: indices must be an integer tensor, got dtype {indices.dtype}; "
            "convert it with .long()."
        )
    xp = array_module(indices.data)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"one_hot: num_classes must be an int, got {num_classes!r}")
    data = indices.data
    if data.size == 0 and num_classes == -1:
        raise ValueError(
            "one_hot: cannot infer num_classes from an empty tensor; pass "
            "num_classes explicitly."
        )
    if num_classes == -1:
        num_classes = int(data.max()) + 1
    if num_classes < 1:
        raise ValueError(
            f"one_hot: num_classes must be positive or -1, got {num_classes}"
        )
    if data.size:
        _check_class_range("one_hot", data, int(num_classes), ignore_index=None)
    classes = xp.arange(num_classes, dtype=data.dtype)
    return make_tensor((data[..., None] == classes).astype(xp.int64))


def _check_class_range(op, target, num_classes, ignore_index):
    """Raise an IndexError naming a class index outside [0, num_classes)."""
    valid = target if ignore_index is None else target[target != ignore_index]
    if valid.size == 0:
        return
    low, high = int(valid.min()), int(valid.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        ignore = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
        raise IndexError(
            f"{op}: class index {bad} is out of range; valid indices are 0 to "
            f"{num_classes - 1}{ignore} for {num_classes} classes."
        )


def _check_index_target(op, input, target):
    """Check class-index ``target`` against ``input`` of shape (N, C, ...) or (C,)."""
    if target.dtype.kind not in "iu":
        hint = (
            " For class probabilities, cross_entropy takes a float target of "
            "the input's shape." if target.dtype.kind == "f" else ""
        )
        raise TypeError(
            f"{op}: target must contain integer class indices, got dtype "
            f"{target.dtype} (shape {tuple(target.shape)}).{hint}"
        )
    if input.ndim == 0:
        raise ValueError(f"{op}: input must have a class axis, got a 0-d tensor")
    expected = () if input.ndim == 1 else input.shape[:1] + input.shape[2:]
    if target.shape != expected:
        hint = (
            " An integer target of the input's shape is not read as class "
            "probabilities; convert it with .float() for that."
            if target.shape == input.shape else ""
        )
        raise ValueError(
            f"{op}: target shape {tuple(target.shape)} does not match input shape "
            f"{tuple(input.shape)}; class-index targets must have shape "
            f"{tuple(expected)} (the input's shape without the class axis 1).{hint}"
        )
    _check_device(op, "target", target, input)


def _check_class_weight(op, weight, input):
    if weight is None:
        return None
    weight = _as_tensor(op, "weight", weight)
    _check_float(op, "weight", weight)
    num_classes = input.shape[0 if input.ndim == 1 else 1]
    if weight.shape != (num_classes,):
        raise ValueError(
            f"{op}: weight must have shape ({num_classes},), one value per "
            f"class, got {tuple(weight.shape)}"
        )
    _check_device(op, "weight", weight, input)
    return weight


def _class_axis_shape(ndim, num_classes):
    """Return the shape that puts a per-class vector on axis 1 of an ndim array."""
    return (1, num_classes) + (1,) * (ndim - 2)


def _nll_parts(log_probs, target, weight, ignore_index):
    """Return (per-element negative log-likelihood, per-element weight).

    ``log_probs`` has shape (N, C, ...) and ``target`` (N, ...). An ignored
    element has loss 0 and weight 0.
    """
    xp = array_module(target.data)
    num_classes = log_probs.shape[1]
    keep = target.data != ignore_index
    safe_target = xp.where(keep, target.data, 0)
    class_shape = _class_axis_shape(log_probs.ndim, num_classes)
    classes = xp.arange(num_classes).reshape(class_shape)
    mask = (xp.expand_dims(safe_target, 1) == classes) & xp.expand_dims(keep, 1)
    selected = (log_probs * make_tensor(mask.astype(log_probs.dtype))).sum(axis=1)
    if weight is None:
        element_weight = make_tensor(keep.astype(log_probs.dtype))
    else:
        element_weight = weight[make_tensor(safe_target)] * make_tensor(
            keep.astype(log_probs.dtype)
        )
    return -selected * element_weight, element_weight


class WeightedMean(Function):
    """total_loss / total_weight, NaN when the weight is 0 but with a 0 gradient.

    When every target is ignored, the total weight is 0 and the mean is
    0/0 = NaN, as in PyTorch. A plain division would also send NaN into
    every gradient (inf times the zero mask), so one fully padded batch
    would spoil the parameters. Here the gradient is 0 in that case.
    """

    @staticmethod
    def forward(ctx, total_loss, total_weight):
        # NumPy's 0/0 warning is expected in the all-ignored case.
        with np.errstate(invalid="ignore", divide="ignore"):
            out = total_loss / total_weight
        ctx.save_for_backward(total_weight, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        total_weight, out = ctx.saved_tensors
        xp = ctx.xp
        empty = total_weight == 0
        safe_weight = xp.where(empty, 1, total_weight)
        safe_out = xp.where(empty, 0, out)
        grad_loss = xp.where(empty, 0, grad / safe_weight)
        grad_weight = xp.where(empty, 0, -grad * safe_out / safe_weight)
        return grad_loss, grad_weight


def _weighted_reduce(loss, element_weight, reduction):
    if reduction == "mean":
        # The mean divides by the total weight of the non-ignored targets.
        return WeightedMean.apply(loss.sum(), element_weight.sum())
    return _reduce(loss, reduction)


def _with_batch_axis(input, target):
    # An unbatched input (C,) with a 0-d target becomes a batch of one.
    if input.ndim == 1 and target.ndim == 0:
        return input.reshape(1, -1), target.reshape(1), True
    return input, target, False


def _common_checks(op, input, target, reduction):
    input, target = _as_tensor(op, "input", input), _as_tensor(op, "target", target)
    _check_reduction(op, reduction)
    _check_float(op, "input", input)
    return input, target


def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean"):
    """Return the negative log-likelihood of class indices under log-probabilities.

    ``input`` has shape (N, C), (N, C, d1, ...) or (C,); ``target`` contains
    integer class indices of shape (N,), (N, d1, ...) or (). ``weight`` (C,)
    scales each class, and targets equal to ``ignore_index`` contribute
    nothing. The mean divides by the summed weight of the counted targets.

    >>> F.nll_loss(gf.tensor([[-1.0, -2.0]]), gf.tensor([1]))
    tensor(2.)
    """
    op = "nll_loss"
    input, target = _common_checks(op, input, target, reduction)
    _check_index_target(op, input, target)
    weight = _check_class_weight(op, weight, input)
    num_classes = input.shape[0 if input.ndim == 1 else 1]
    _check_class_range(op, target.data, num_classes, ignore_index)
    batched_input, batched_target, unbatched = _with_batch_axis(input, target)
    loss, element_weight = _nll_parts(
        batched_input, batched_target, weight, ignore_index
    )
    if unbatched:
        loss, element_weight = loss.reshape(()), element_weight.reshape(())
    return _weighted_reduce(loss, element_weight, reduction)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0):
    """Return the cross-entropy between ``softmax(input)`` along axis 1 and ``target``.

    ``input`` contains unnormalized scores (logits) of shape (N, C),
    (N, C, d1, ...) or (C,). ``target`` is either integer class indices of the
    input's shape without axis 1, or class probabilities of the input's own
    shape (float). ``label_smoothing`` in [0, 1] mixes the target with the
    uniform distribution over the C classes. ``weight`` (C,) scales each
    class. ``ignore_index`` applies to class-index targets only; the mean
    over class indices divides by the summed weight of the counted targets,
    and the mean over probabilities by the number of elements N * d1 * ...

    >>> F.cross_entropy(gf.tensor([[0.0, 0.0]]), gf.tensor([1]))
    tensor(0.6931472)
    """
    op = "cross_entropy"
    input, target = _common_checks(op, input, target, reduction)
    smoothing = _check_label_smoothing(op, label_smoothing)
    if input.ndim == 0:
        raise ValueError(f"{op}: input must have a class axis, got a 0-d tensor")
    if target.dtype.kind == "f":
        _check_probability_target(op, input, target)
        weight = _check_class_weight(op, weight, input)
        return _cross_entropy_probabilities(input, target, weight, reduction, smoothing)
    _check_index_target(op, input, target)
    weight = _check_class_weight(op, weight, input)
    num_classes = input.shape[0 if input.ndim == 1 else 1]
    _check_class_range(op, target.data, num_classes, ignore_index)
    batched_input, batched_target, unbatched = _with_batch_axis(input, target)
    loss = _cross_entropy_indices(
        batched_input, batched_target, weight, ignore_index, reduction, smoothing
    )
    return loss.reshape(()) if unbatched and reduction == "none" else loss


def _check_label_smoothing(op, label_smoothing):
    smoothing = label_smoothing
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real):
        raise TypeError(f"{op}: label_smoothing must be a float, got {smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}"
        )
    return float(label_smoothing)


def _check_probability_target(op, input, target):
    if target.shape != input.shape:
        raise ValueError(
            f"{op}: a float target is read as class probabilities and must "
            f"have the input's shape {tuple(input.shape)}, got "
            f"{tuple(target.shape)}. For "
            "class indices pass an integer target (e.g. target.long())."
        )
    _check_device(op, "target", target, input)


def _cross_entropy_indices(input, target, weight, ignore_index, reduction, smoothing):
    log_probs = log_softmax(input, dim=1)
    loss, element_weight = _nll_parts(log_probs, target, weight, ignore_index)
    loss = _weighted_reduce(loss, element_weight, reduction)
    if smoothing == 0.0:
        return loss
    # The smoothed part is the cross-entropy against the uniform distribution,
    # weighted per class and reduced with the same denominator as the rest.
    num_classes = input.shape[1]
    keep = make_tensor((target.data != ignore_index).astype(input.dtype))
    if weight is not None:
        class_shape = _class_axis_shape(input.ndim, num_classes)
        log_probs = log_probs * weight.reshape(class_shape)
    uniform_loss = -log_probs.sum(axis=1) * keep
    uniform_loss = _weighted_reduce(uniform_loss, element_weight, reduction)
    return (1 - smoothing) * loss + (smoothing / num_classes) * uniform_loss


def _cross_entropy_probabilities(input, target, weight, reduction, smoothing):
    class_axis = 0 if input.ndim == 1 else 1
    num_classes = input.shape[class_axis]
    log_probs = log_softmax(input, dim=class_axis)
    if smoothing:
        target = target * (1 - smoothing) + smoothing / num_classes
    if weight is not None:
        shape = (num_classes,) if input.ndim == 1 else _class_axis_shape(
            input.ndim, num_classes
        )
        log_probs = log_probs * weight.reshape(shape)
    loss = -(log_probs * target).sum(axis=class_axis)
    return _reduce(loss, reduction)


# -- module forms -------------------------------------------------------


class _Loss(Module):
    def __init__(self, reduction="mean"):
        super().__init__()
        _check_reduction(type(self).__name__, reduction)
        self.reduction = reduction

    def extra_repr(self):
        return f"reduction='{self.reduction}'"


class MSELoss(_Loss):
    """The module form of ``mse_loss``."""

    def forward(self, input, target):
        return mse_loss(input, target, reduction=self.reduction)


class BCELoss(_Loss):
    """The module form of ``binary_cross_entropy``, with ``weight`` as a buffer."""

    def __init__(self, weight=None, reduction="mean"):
        super().__init__(reduction)
        self.register_buffer("weight", weight)

    def forward(self, input, target):
        return binary_cross_entropy(input, target, self.weight, self.reduction)


class BCEWithLogitsLoss(_Loss):
    """The module form of ``binary_cross_entropy_with_logits``."""

    def __init__(self, weight=None, reduction="mean", pos_weight=None):
        super().__init__(reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(
            input, target, self.weight, self.reduction, self.pos_weight
        )


class NLLLoss(_Loss):
    """The module form of ``nll_loss``."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean"):
        super().__init__(reduction)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index

    def forward(self, input, target):
        return nll_loss(input, target, self.weight, self.ignore_index, self.reduction)


class CrossEntropyLoss(_Loss):
    """The module form of ``cross_entropy``."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0):
        super().__init__(reduction)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.label_smoothing = _check_label_smoothing(
            "CrossEntropyLoss", label_smoothing
        )

    def forward(self, input, target):
        return cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction,
            self.label_smoothing,
        )
