"""Convolutions: ``conv2d`` and ``conv1d``, and the ``Conv2d`` and ``Conv1d`` layers.

A convolution is an im2col gather followed by one matrix product per group.
``Im2col`` copies every receptive field of the zero-padded input into a
column matrix, and its adjoint ``Col2im`` scatters columns back with
accumulation, since overlapping windows share input pixels. Each of the two
is the other's backward, so gradients of any order flow through them, and
the matrix product and the bias add are ordinary gradflow ops.
"""

import math

from .._device import array_module
from .._tensor import Tensor
from .._factories import empty
from ..autograd import Function
from . import init
from ._module import Module, Parameter

__all__ = ["conv1d", "conv2d", "Conv1d", "Conv2d"]


# -- window geometry ----------------------------------------------------


def as_pair(op, name, value):
    """Return ``value`` (an int or a sequence of two ints) as a tuple of two ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{op}: {name} must be an int or two ints, got {value!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise TypeError(f"{op}: {name} must be an int or two ints, got {value!r}")
    return pair


def output_size(op, size, kernel, stride, dilation, pads):
    """Return the output length of one spatial axis.

    Raises ValueError when the dilated kernel is longer than the padded input.
    """
    padded = size + pads[0] + pads[1]
    span = dilation * (kernel - 1) + 1
    if span > padded:
        raise ValueError(
            f"{op}: the kernel spans {span} elements (kernel size {kernel}, "
            f"dilation {dilation}) but the padded input has only {padded} "
            f"(size {size}, padding {pads}). Use a smaller kernel or more padding."
        )
    return (padded - span) // stride + 1


def pad_spatial(xp, x, pads, value):
    """Pad the last two axes of ``x`` by ``pads = ((top, bottom), (left, right))``."""
    if not any(pads[0] + pads[1]):
        return x
    widths = ((0, 0),) * (x.ndim - 2) + tuple(pads)
    return xp.pad(x, widths, mode="constant", constant_values=value)


def window_view(xp, padded, kernel, stride, dilation, out_hw):
    """Return a strided view of ``padded`` (N, C, H, W) as (N, C, kh, kw, Ho, Wo).

    The view shares memory with ``padded``: copy it before writing to it.
    """
    s_n, s_c, s_h, s_w = padded.strides
    shape = padded.shape[:2] + tuple(kernel) + tuple(out_hw)
    strides = (
        s_n, s_c, s_h * dilation[0], s_w * dilation[1],
        s_h * stride[0], s_w * stride[1],
    )
    return xp.lib.stride_tricks.as_strided(padded, shape, strides)


class Geometry:
    """Kernel size, stride, dilation and padding of a 2-D sliding window."""

    __slots__ = ("kernel", "stride", "dilation", "pads", "in_hw", "out_hw")

    def __init__(self, op, in_hw, kernel, stride, dilation, pads):
        self.kernel, self.stride, self.dilation = kernel, stride, dilation
        self.pads, self.in_hw = pads, tuple(in_hw)
        self.out_hw = tuple(
            output_size(op, in_hw[a], kernel[a], stride[a], dilation[a], pads[a])
            for a in (0, 1)
        )


# -- im2col and its adjoint ---------------------------------------------


def _im2col(x, geo):
    xp = array_module(x)
    padded = xp.ascontiguousarray(pad_spatial(xp, x, geo.pads, 0))
    view = window_view(xp, padded, geo.kernel, geo.stride, geo.dilation, geo.out_hw)
    # (C, kh, kw, N, Ho, Wo): a group's rows are contiguous, and one matrix
    # product per group covers the whole batch.
    return xp.ascontiguousarray(view.transpose(1, 2, 3, 0, 4, 5))


def _col2im(cols, batch_shape, geo):
    xp = array_module(cols)
    (top, bottom), (left, right) = geo.pads
    height, width = geo.in_hw
    out = xp.zeros(
        tuple(batch_shape) + (height + top + bottom, width + left + right),
        dtype=cols.dtype,
    )
    grad = cols.transpose(3, 0, 1, 2, 4, 5)
    rows = geo.stride[0] * (geo.out_hw[0] - 1) + 1
    columns = geo.stride[1] * (geo.out_hw[1] - 1) + 1
    for i in range(geo.kernel[0]):
        h = i * geo.dilation[0]
        for j in range(geo.kernel[1]):
            w = j * geo.dilation[1]
            out[:, :, h:h + rows:geo.stride[0], w:w + columns:geo.stride[1]] += (
                grad[:, :, i, j]
            )
    return xp.ascontiguousarray(out[:, :, top:top + height, left:left + width])


class Im2col(Function):
    """Gather of every window of (N, C, H, W) input into columns.

    The columns have shape (C, kh, kw, N, Ho, Wo).
    """

    @staticmethod
    def forward(ctx, x, geo):
        ctx.geo, ctx.batch_shape = geo, x.shape[:2]
        return _im2col(x, geo)

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, Tensor):
            return Col2im.apply(grad, ctx.batch_shape, ctx.geo), None
        return _col2im(grad, ctx.batch_shape, ctx.geo), None


class Col2im(Function):
    """Adjoint of Im2col, which adds each column back onto the pixels it read."""

    @staticmethod
    def forward(ctx, cols, batch_shape, geo):
        ctx.geo = geo
        return _col2im(cols, batch_shape, geo)

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, Tensor):
            return Im2col.apply(grad, ctx.geo), None, None
        return _im2col(grad, ctx.geo), None, None


def im2col(x, geo):
    """Return the windows of ``x`` (N, C, H, W) as a (C, kh, kw, N, Ho, Wo) Tensor."""
    return Im2col.apply(x, geo)


# -- conv2d -------------------------------------------------------------


def _same_pads(op, kernel, stride, dilation):
    if stride != (1, 1):
        raise ValueError(
            f"{op}: padding='same' needs stride 1, got stride {stride}; "
            "pass explicit padding instead."
        )
    # An odd total puts the extra element on the bottom/right side.
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return tuple((t // 2, t - t // 2) for t in totals)


def conv_pads(op, padding, kernel, stride, dilation):
    """Return ``padding`` as ((top, bottom), (left, right)).

    ``padding`` is an int, a pair of ints, ``"same"`` or ``"valid"``.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            return _same_pads(op, kernel, stride, dilation)
        raise ValueError(
            f"{op}: padding must be an int, a pair of ints, 'same' or 'valid', "
            f"got {padding!r}"
        )
    pair = as_pair(op, "padding", padding)
    if min(pair) < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {padding!r}")
    return ((pair[0], pair[0]), (pair[1], pair[1]))


def _check_positive(op, name, pair):
    if min(pair) < 1:
        raise ValueError(f"{op}: {name} must be positive, got {pair}")


def _check_tensors(op, input, weight, bias):
    for name, value in (("input", input), ("weight", weight), ("bias", bias)):
        if not isinstance(value, Tensor) and not (name == "bias" and value is None):
            raise TypeError(
                f"{op}: {name} must be a Tensor, got {type(value).__name__}"
            )


def _check_conv_operands(op, x, weight, bias, groups):
    if x.dtype.kind != "f" or x.dtype != weight.dtype:
        raise TypeError(
            f"{op}: input and weight must share one floating dtype, got "
            f"{x.dtype} and {weight.dtype}; convert with .float() or .double()."
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    out_channels, in_per_group = weight.shape[:2]
    if out_channels % groups:
        raise ValueError(
            f"{op}: weight of shape {tuple(weight.shape)} has {out_channels} "
            f"output channels, which groups={groups} does not divide."
        )
    if x.shape[1] != in_per_group * groups:
        raise ValueError(
            f"{op}: input of shape {tuple(x.shape)} has {x.shape[1]} channels, "
            f"but weight of shape {tuple(weight.shape)} with groups={groups} "
            f"expects {in_per_group * groups}."
        )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"{op}: bias must have shape ({out_channels},) to match weight "
            f"{tuple(weight.shape)}, got {tuple(bias.shape)}."
        )


def _conv2d_batched(x, weight, bias, geo, groups):
    out_channels = weight.shape[0]
    batch = x.shape[0]
    cols = im2col(x, geo)
    rows = cols.shape[0] * cols.shape[1] * cols.shape[2] // groups
    if groups == 1:
        # NOTE: a 2-D product reaches BLAS in both directions of backward;
        # NumPy's batched matmul with a transposed operand is many times slower.
        cols = cols.reshape(rows, -1)
        kernels = weight.reshape(out_channels, rows)
    else:
        cols = cols.reshape(groups, rows, -1)
        kernels = weight.reshape(groups, out_channels // groups, rows)
    out = (kernels @ cols).reshape((out_channels, batch) + geo.out_hw)
    out = out.permute(1, 0, 2, 3)
    if bias is not None:
        out = out + bias.reshape(1, out_channels, 1, 1)
    return out


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Apply a 2-D convolution (cross-correlation, as in PyTorch).

    Args:
        input: (N, C, H, W), or (C, H, W) for a single unbatched sample.
        weight: (O, C // groups, kh, kw), of the input's floating dtype.
        bias: (O,) or None.
        stride, dilation: an int or a pair (height, width).
        padding: an int, a pair, ``"valid"`` (none) or ``"same"`` (output as
            large as the input; stride 1 only). Padding adds zeros.
        groups: splits the channels into this many independent convolutions.

    Returns:
        (N, O, Ho, Wo), where Ho = (H + 2 * pad - dilation * (kh - 1) - 1)
        // stride + 1 (and likewise Wo).

    >>> x = gf.randn(2, 3, 8, 8)
    >>> gf.nn.functional.conv2d(x, gf.randn(4, 3, 3, 3), padding=1).shape
    (2, 4, 8, 8)
    """
    op = "conv2d"
    _check_tensors(op, input, weight, bias)
    if input.ndim not in (3, 4) or weight.ndim != 4:
        raise ValueError(
            f"{op}: expected input (N, C, H, W) or (C, H, W) and weight "
            f"(O, C/groups, kh, kw), got shapes {tuple(input.shape)} and "
            f"{tuple(weight.shape)}."
        )
    if input.ndim == 3:
        out = conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                     groups)
        return out.squeeze(0)
    _check_conv_operands(op, input, weight, bias, groups)
    kernel = tuple(weight.shape[2:])
    stride = as_pair(op, "stride", stride)
    dilation = as_pair(op, "dilation", dilation)
    _check_positive(op, "stride", stride)
    _check_positive(op, "dilation", dilation)
    pads = conv_pads(op, padding, kernel, stride, dilation)
    geo = Geometry(op, input.shape[2:], kernel, stride, dilation, pads)
    return _conv2d_batched(input, weight, bias, geo, groups)


def _as_single(op, name, value):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{op}: {name} must be an int or one int, got {value!r}")
        value = value[0]
    return value


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Apply a 1-D convolution to (N, C, L) or unbatched (C, L) input.

    ``weight`` is (O, C // groups, k); the other arguments are as in
    ``conv2d``, with ints (or one-element tuples) in place of pairs. It runs
    as ``conv2d`` on a height-1 image.

    >>> gf.nn.functional.conv1d(gf.randn(2, 3, 10), gf.randn(4, 3, 5)).shape
    (2, 4, 6)
    """
    op = "conv1d"
    _check_tensors(op, input, weight, bias)
    if input.ndim not in (2, 3) or weight.ndim != 3:
        raise ValueError(
            f"{op}: expected input (N, C, L) or (C, L) and weight (O, C/groups, k), "
            f"got shapes {tuple(input.shape)} and {tuple(weight.shape)}."
        )
    stride, dilation = (_as_single(op, n, v) for n, v in
                        (("stride", stride), ("dilation", dilation)))
    padding = _as_single(op, "padding", padding)
    if not isinstance(padding, str):
        padding = (0, padding)
    out = conv2d(
        input.unsqueeze(-2), weight.unsqueeze(2), bias,
        (1, stride), padding, (1, dilation), groups,
    )
    return out.squeeze(-2)


# -- layers -------------------------------------------------------------


class _ConvNd(Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding,
                 dilation, groups, bias, padding_mode, device, dtype):
        super().__init__()
        op = type(self).__name__
        for name, value in (("in_channels", in_channels),
                            ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{op}: groups={groups} must divide in_channels={in_channels} "
                f"and out_channels={out_channels}."
            )
        if padding_mode != "zeros":
            # TODO: 'reflect', 'replicate' and 'circular' need their own
            # padding adjoint in Col2im; only zero padding exists so far.
            raise NotImplementedError(
                f"{op}: padding_mode={padding_mode!r} is not supported; only "
                "'zeros' is implemented."
            )
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(
                f"{op}: padding must be an int, a tuple, 'same' or 'valid', "
                f"got {padding!r}"
            )
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(
                f"{op}: padding='same' needs stride 1, got stride {stride}; "
                "pass explicit padding instead."
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.padding, self.dilation = padding, dilation
        self.groups, self.padding_mode = groups, padding_mode
        shape = (out_channels, in_channels // groups) + kernel_size
        self.weight = Parameter(empty(*shape, device=device, dtype=dtype))
        if bias:
            self.bias = Parameter(empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Draw new initial values for the weight and the bias.

        Both come from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is what
        kaiming_uniform_ with a = sqrt(5) gives for the weight.
        """
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = math.prod(self.weight.shape[1:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def extra_repr(self):
        text = (
            f"{self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}"
        )
        if self.padding not in (0, (0,), (0, 0)):
            text += f", padding={self.padding}"
        if self.dilation not in ((1,), (1, 1)):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


def _geometry_tuples(op, to_tuple, kernel_size, stride, padding, dilation):
    """Convert the size arguments with ``to_tuple``, keeping a string padding as is.

    Padding is converted first, so it is the one reported when several are invalid.
    """
    if not isinstance(padding, str):
        padding = to_tuple(op, "padding", padding)
    return (to_tuple(op, "kernel_size", kernel_size), to_tuple(op, "stride", stride),
            padding, to_tuple(op, "dilation", dilation))


class Conv2d(_ConvNd):
    """A 2-D convolution layer over (N, C, H, W) input; see ``conv2d``.

    ``weight`` is (out_channels, in_channels // groups, kh, kw) and ``bias``
    (out_channels,), both drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
    fan_in = in_channels // groups * kh * kw.

    >>> conv = gf.nn.Conv2d(1, 8, 3, padding="same")
    >>> conv(gf.randn(4, 1, 8, 8)).shape
    (4, 8, 8, 8)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros",
                 device=None, dtype=None):
        kernel_size, stride, padding, dilation = _geometry_tuples(
            "Conv2d", as_pair, kernel_size, stride, padding, dilation
        )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups, bias, padding_mode, device, dtype,
        )

    def forward(self, input):
        return conv2d(input, self.weight, self.bias, self.stride, self.padding,
                      self.dilation, self.groups)


def _single(op, name, value):
    value = _as_single(op, name, value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    return (value,)


class Conv1d(_ConvNd):
    """A 1-D convolution layer over (N, C, L) input; see ``conv1d``.

    ``weight`` is (out_channels, in_channels // groups, k), initialised as
    in ``Conv2d`` with fan_in = in_channels // groups * k.

    >>> gf.nn.Conv1d(3, 4, 5)(gf.randn(2, 3, 10)).shape
    (2, 4, 6)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros",
                 device=None, dtype=None):
        kernel_size, stride, padding, dilation = _geometry_tuples(
            "Conv1d", _single, kernel_size, stride, padding, dilation
        )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups, bias, padding_mode, device, dtype,
        )

    def forward(self, input):
        return conv1d(input, self.weight, self.bias, self.stride, self.padding,
                      self.dilation, self.groups)
