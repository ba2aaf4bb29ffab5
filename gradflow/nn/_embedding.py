"""Embedding lookup: rows of a weight matrix selected by integer indices."""

from .._factories import empty
from .._tensor import Tensor
from ..autograd import Function
from . import init
from ._module import Module, Parameter

__all__ = ["embedding", "Embedding"]


class EmbeddingFunction(Function):
    """Row lookup ``weight[indices]``, whose backward scatters rows back with addition.

    A repeated index accumulates, and the row ``padding_idx`` (when not None)
    gets no gradient.
    """

    @staticmethod
    def forward(ctx, weight, indices, padding_idx):
        ctx.indices, ctx.padding_idx = indices, padding_idx
        ctx.weight_shape = weight.shape
        return weight[indices]

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        if ctx.padding_idx is not None:
            keep = (ctx.indices != ctx.padding_idx)[..., None]
            grad = xp.where(keep, grad, 0)
        return xp.index_scatter(grad, ctx.weight_shape, ctx.indices), None, None


def _check_indices(op, indices, num_embeddings):
    if indices.dtype.kind not in "iu":
        raise TypeError(
            f"{op}: indices must be an integer tensor, got dtype {indices.dtype} "
            f"(shape {tuple(indices.shape)}); convert them with .astype(gf.int64)."
        )
    if indices.size == 0:
        return
    # NOTE: this bounds check reads two values back from the device.
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= num_embeddings:
        bad = low if low < 0 else high
        raise IndexError(
            f"{op}: index {bad} is out of range for {num_embeddings} embeddings "
            f"(valid: 0 to {num_embeddings - 1})."
        )


def _normalize_padding_idx(op, padding_idx, num_embeddings):
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"{op}: padding_idx {padding_idx} is out of range for "
            f"{num_embeddings} embeddings."
        )
    return padding_idx % num_embeddings


def embedding(input, weight, padding_idx=None):
    """Return the rows of ``weight`` (num_embeddings, dim) at ``input``.

    ``input`` is an integer Tensor (or array) of any shape; the result has
    shape ``input.shape + (dim,)``. The row ``padding_idx`` receives no
    gradient.

    >>> table = gf.randn(10, 3)
    >>> F.embedding(gf.tensor([[1, 2], [4, 4]]), table).shape
    (2, 2, 3)
    """
    op = "embedding"
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        shape = tuple(weight.shape) if hasattr(weight, "shape") else weight
        raise ValueError(f"{op}: weight must be a 2-D Tensor, got {shape!r}.")
    indices = input.data if isinstance(input, Tensor) else input
    if not hasattr(indices, "dtype"):
        indices = weight.device.xp.asarray(indices)
    _check_indices(op, indices, weight.shape[0])
    padding_idx = _normalize_padding_idx(op, padding_idx, weight.shape[0])
    return EmbeddingFunction.apply(weight, indices, padding_idx)


class Embedding(Module):
    """A lookup table of ``num_embeddings`` vectors of size ``embedding_dim``.

    ``weight`` starts from N(0, 1), with the row ``padding_idx`` (if given)
    set to zero. That row receives no gradient, so training leaves it at
    zero unless it is changed directly.

    >>> gf.nn.Embedding(10, 4)(gf.tensor([0, 3, 3])).shape
    (3, 4)
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None,
                 max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                 sparse=False, _weight=None, _freeze=False, device=None,
                 dtype=None):
        super().__init__()
        op = "Embedding"
        if max_norm is not None or scale_grad_by_freq or sparse:
            # TODO: max_norm renormalization, gradient scaling by frequency
            # and sparse gradients are not implemented.
            raise NotImplementedError(
                f"{op}: max_norm, scale_grad_by_freq and sparse are not "
                "supported; leave them at their defaults."
            )
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = _normalize_padding_idx(op, padding_idx, num_embeddings)
        self.max_norm, self.norm_type = max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        if _weight is None:
            weight = empty(num_embeddings, embedding_dim, device=device, dtype=dtype)
            self.weight = Parameter(weight, requires_grad=not _freeze)
            self.reset_parameters()
        else:
            if tuple(_weight.shape) != (num_embeddings, embedding_dim):
                raise ValueError(
                    f"{op}: _weight has shape {tuple(_weight.shape)}, expected "
                    f"({num_embeddings}, {embedding_dim})."
                )
            self.weight = Parameter(_weight, requires_grad=not _freeze)

    def reset_parameters(self):
        """Draw the weight from N(0, 1) and zero the padding row."""
        init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight.data[self.padding_idx] = 0

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, padding_idx=None):
        """Build an Embedding whose weight is the 2-D Tensor ``embeddings``.

        The weight shares memory with ``embeddings``; ``freeze`` turns off
        its gradient.
        """
        if embeddings.ndim != 2:
            raise ValueError(
                f"Embedding.from_pretrained: embeddings must be 2-D, got shape "
                f"{tuple(embeddings.shape)}."
            )
        rows, dim = embeddings.shape
        return cls(rows, dim, padding_idx=padding_idx, _weight=embeddings,
                   _freeze=freeze)

    def forward(self, input):
        return embedding(input, self.weight, self.padding_idx)

    def extra_repr(self):
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return text
