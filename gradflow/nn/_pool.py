"""2-D pooling: max, average and adaptive average, as functions and layers.

All three take (N, C, H, W) or unbatched (C, H, W) input. Max pooling sends
each output's gradient to the first maximum of its window, in row-major order
within the window as PyTorch does. Average pooling is a window sum from
``im2col`` divided by a constant count. Adaptive average pooling multiplies
by two constant averaging matrices, one per spatial axis.
"""

import numpy as np

from .._device import array_module
from .._tensor import Tensor, make_tensor
from ..autograd import Function
from ._conv import Geometry, as_pair, im2col, pad_spatial, window_view
from ._module import Module

__all__ = [
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
]


# -- geometry -----------------------------------------------------------


def _ceil_extra(size, kernel, stride, dilation, pad):
    # Return the extra bottom/right padding that makes the floor formula give
    # the ceil_mode size. As in PyTorch, the last window must still start
    # inside the input or the left padding.
    span = dilation * (kernel - 1) + 1
    padded = size + 2 * pad
    if span > padded:
        return 0
    count = -(-(padded - span) // stride) + 1
    if (count - 1) * stride >= size + pad:
        count -= 1
    return max(0, (count - 1) * stride + span - padded)


def pool_geometry(op, x, kernel_size, stride, padding, dilation, ceil_mode):
    """Return the Geometry of a pooling window over ``x`` (N, C, H, W)."""
    kernel = as_pair(op, "kernel_size", kernel_size)
    stride = kernel if stride is None or stride == () else as_pair(op, "stride", stride)
    padding = as_pair(op, "padding", padding)
    dilation = as_pair(op, "dilation", dilation)
    for name, pair in (("kernel_size", kernel), ("stride", stride),
                       ("dilation", dilation)):
        if min(pair) < 1:
            raise ValueError(f"{op}: {name} must be positive, got {pair}")
    for axis in (0, 1):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        if not 0 <= padding[axis] <= span // 2:
            raise ValueError(
                f"{op}: padding {padding} must be non-negative and at most half "
                f"the kernel span ({span} for kernel {kernel}, dilation "
                f"{dilation}), so every window covers part of the input."
            )
    pads = []
    for axis in (0, 1):
        extra = 0
        if ceil_mode:
            extra = _ceil_extra(x.shape[2 + axis], kernel[axis], stride[axis],
                                dilation[axis], padding[axis])
        pads.append((padding[axis], padding[axis] + extra))
    return Geometry(op, x.shape[2:], kernel, stride, dilation, tuple(pads))


def _check_input(op, x):
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{op}: expected input (N, C, H, W) or (C, H, W), got shape "
            f"{tuple(x.shape)}."
        )
    if x.dtype.kind != "f":
        raise TypeError(
            f"{op}: expected a floating-point input, got dtype {x.dtype}; "
            "convert it with .float() or .double()."
        )


# -- max pooling --------------------------------------------------------


def _argmax_positions(arg, geo, width):
    """Turn window offsets ``arg`` (N, C, Ho, Wo) into flat input indices h * W + w."""
    xp = array_module(arg)
    kernel_w = geo.kernel[1]
    out_h = xp.arange(geo.out_hw[0]).reshape(-1, 1)
    out_w = xp.arange(geo.out_hw[1])
    rows = out_h * geo.stride[0] - geo.pads[0][0] + (arg // kernel_w) * geo.dilation[0]
    cols = out_w * geo.stride[1] - geo.pads[1][0] + (arg % kernel_w) * geo.dilation[1]
    return rows * width + cols


class MaxPool2dFunction(Function):
    """Max over each window, whose gradient goes to the position of that max."""

    @staticmethod
    def forward(ctx, x, geo):
        xp = array_module(x)
        padded = xp.ascontiguousarray(pad_spatial(xp, x, geo.pads, -xp.inf))
        view = window_view(xp, padded, geo.kernel, geo.stride, geo.dilation,
                           geo.out_hw)
        batch, channels = x.shape[:2]
        windows = view.reshape((batch, channels, -1) + geo.out_hw)
        arg = windows.argmax(axis=2)
        out = xp.take_along_axis(windows, arg[:, :, None], axis=2)[:, :, 0]
        indices = _argmax_positions(arg, geo, x.shape[3])
        # The indices are saved (not kept in an attribute), so backward
        # frees them.
        ctx.save_for_backward(indices)
        ctx.in_shape = x.shape
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad, grad_indices):
        batch, channels, height, width = ctx.in_shape
        xp = ctx.xp
        (indices,) = ctx.saved_tensors
        # A recorded backward gets the indices back as a Tensor.
        if isinstance(indices, Tensor):
            indices = indices.data
        flat = xp.reshape(grad, (batch, channels, -1))
        index = indices.reshape(batch, channels, -1)
        module = array_module(index)
        target = (
            module.arange(batch).reshape(-1, 1, 1),
            module.arange(channels).reshape(1, -1, 1),
            index,
        )
        grad_x = xp.index_scatter(flat, (batch, channels, height * width), target)
        return xp.reshape(grad_x, ctx.in_shape), None


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode=False, return_indices=False):
    """Return the maximum of each window of ``input`` (N, C, H, W) or (C, H, W).

    ``stride`` defaults to ``kernel_size``. Padding counts as -inf, so it is
    never the maximum. With ``return_indices`` also returns, per output, the
    flat index h * W + w of the chosen input element (an int64 Tensor).

    >>> gf.nn.functional.max_pool2d(gf.randn(1, 2, 8, 8), 2).shape
    (1, 2, 4, 4)
    """
    op = "max_pool2d"
    _check_input(op, input)
    if input.ndim == 3:
        out = max_pool2d(input.unsqueeze(0), kernel_size, stride, padding,
                         dilation, ceil_mode, return_indices)
        if return_indices:
            return out[0].squeeze(0), out[1].squeeze(0)
        return out.squeeze(0)
    geo = pool_geometry(op, input, kernel_size, stride, padding, dilation, ceil_mode)
    out, indices = MaxPool2dFunction.apply(input, geo)
    return (out, indices) if return_indices else out


# -- average pooling ----------------------------------------------------


def _window_counts(xp, in_hw, geo, count_include_pad):
    """Return the (Ho, Wo) number of elements that each window averages over."""
    (top, bottom), (left, right) = geo.pads
    if count_include_pad:
        # Explicit padding counts, but the extra ceil_mode overhang does not.
        mask = np.ones((1, 1, in_hw[0] + 2 * top, in_hw[1] + 2 * left))
        pads = ((0, bottom - top), (0, right - left))
    else:
        mask = np.ones((1, 1) + tuple(in_hw))
        pads = geo.pads
    padded = np.ascontiguousarray(pad_spatial(np, mask, pads, 0))
    view = window_view(np, padded, geo.kernel, geo.stride, geo.dilation, geo.out_hw)
    return xp.asarray(view.sum(axis=(2, 3))[0, 0])


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """Return the mean of each window of ``input`` (N, C, H, W) or (C, H, W).

    ``stride`` defaults to ``kernel_size``. Padding adds zeros; with
    ``count_include_pad`` they count in the divisor, otherwise only input
    elements do. ``divisor_override`` replaces the divisor when given.

    >>> gf.nn.functional.avg_pool2d(gf.ones(1, 1, 4, 4), 2).shape
    (1, 1, 2, 2)
    """
    op = "avg_pool2d"
    _check_input(op, input)
    if input.ndim == 3:
        return avg_pool2d(input.unsqueeze(0), kernel_size, stride, padding,
                          ceil_mode, count_include_pad, divisor_override).squeeze(0)
    geo = pool_geometry(op, input, kernel_size, stride, padding, 1, ceil_mode)
    sums = im2col(input, geo).sum(axis=(1, 2)).permute(1, 0, 2, 3)
    if divisor_override is not None:
        if divisor_override == 0:
            raise ValueError(f"{op}: divisor_override must be non-zero")
        return sums / divisor_override
    xp = array_module(input.data)
    counts = _window_counts(xp, input.shape[2:], geo, count_include_pad)
    return sums / make_tensor(counts.astype(input.dtype))


# -- adaptive average pooling -------------------------------------------


def _averaging_matrix(in_size, out_size, dtype):
    """Return the (out_size, in_size) matrix whose row i averages bin i.

    Bin i covers [floor(i * in / out), ceil((i + 1) * in / out)), PyTorch's
    rule, so neighbouring bins overlap when ``in_size`` is not a multiple.
    """
    matrix = np.zeros((out_size, in_size), dtype=dtype)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -(-((i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _adaptive_size(op, output_size, in_hw):
    if isinstance(output_size, (list, tuple)):
        if len(output_size) != 2:
            raise ValueError(f"{op}: output_size must be an int or two, got "
                             f"{output_size!r}")
        sizes = tuple(in_hw[a] if output_size[a] is None else output_size[a]
                      for a in (0, 1))
    else:
        sizes = (output_size, output_size)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"{op}: output_size must hold positive ints, got "
                         f"{output_size!r}")
    return sizes


def adaptive_avg_pool2d(input, output_size):
    """Average ``input`` (N, C, H, W) or (C, H, W) into ``output_size`` bins.

    ``output_size`` is an int or a pair, where None keeps that input size.
    Bin i of an axis of length n out of m bins covers
    [floor(i * n / m), ceil((i + 1) * n / m)).

    >>> gf.nn.functional.adaptive_avg_pool2d(gf.randn(1, 3, 7, 5), (2, 3)).shape
    (1, 3, 2, 3)
    """
    op = "adaptive_avg_pool2d"
    _check_input(op, input)
    height, width = input.shape[-2:]
    out_h, out_w = _adaptive_size(op, output_size, (height, width))
    xp = array_module(input.data)
    rows = make_tensor(xp.asarray(_averaging_matrix(height, out_h, input.dtype)))
    cols = make_tensor(xp.asarray(_averaging_matrix(width, out_w, input.dtype).T))
    return rows @ input @ cols


# -- layers -------------------------------------------------------------


class MaxPool2d(Module):
    """Max pooling over (N, C, H, W) input; see ``max_pool2d``.

    >>> gf.nn.MaxPool2d(2)(gf.randn(1, 1, 4, 4)).shape
    (1, 1, 2, 2)
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1,
                 return_indices=False, ceil_mode=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = return_indices, ceil_mode

    def forward(self, input):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.ceil_mode, self.return_indices)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, "
                f"ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    """Average pooling over (N, C, H, W) input; see ``avg_pool2d``.

    >>> gf.nn.AvgPool2d(2)(gf.randn(1, 1, 4, 4)).shape
    (1, 1, 2, 2)
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding, self.ceil_mode = padding, ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def forward(self, input):
        return avg_pool2d(input, self.kernel_size, self.stride, self.padding,
                          self.ceil_mode, self.count_include_pad,
                          self.divisor_override)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


class AdaptiveAvgPool2d(Module):
    """Adaptive average pooling to a fixed output size; see ``adaptive_avg_pool2d``.

    >>> gf.nn.AdaptiveAvgPool2d(1)(gf.randn(2, 8, 5, 5)).shape
    (2, 8, 1, 1)
    """

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, input):
        return adaptive_avg_pool2d(input, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"
