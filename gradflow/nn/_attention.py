"""Scaled dot-product attention and ``MultiheadAttention``.

Both are compositions of gradflow's differentiable ops (matmul, add,
reshape) around one Function of this module, ``MaskedSoftmax``, so forward
and backward run on NumPy and CuPy alike.

Masking convention of ``scaled_dot_product_attention``: a bool mask is True
where a query may attend to a key, and a float mask is added to the scores.
``MultiheadAttention`` follows PyTorch's module convention instead: a bool
``attn_mask`` or ``key_padding_mask`` is True where attending is *not*
allowed.
"""

import math

import numpy as np

from .. import _ops
from .._factories import empty, zeros
from .._ops._common import check_float
from .._ops._unary import ctx_xp
from .._tensor import Tensor, as_tensor, make_tensor
from ..autograd import Function
from . import init
from ._dropout import check_dropout_p, dropout
from ._layers import Linear
from ._module import Module, Parameter

__all__ = ["scaled_dot_product_attention", "MultiheadAttention"]


class MaskedSoftmax(Function):
    """Softmax over the last axis that returns 0 for a row with no finite entry.

    A plain softmax of a row that is all ``-inf`` is 0/0 = NaN, and the NaN
    reaches every gradient that flows through the row. Here such a row
    returns zeros, its backward returns zeros, and every other row is an
    ordinary stable softmax.
    """

    @staticmethod
    def forward(ctx, x):
        xp = ctx_xp(x)
        row_max = x.max(axis=-1, keepdims=True)
        row_max = xp.where(xp.isfinite(row_max), row_max, 0)
        exps = xp.exp(x - row_max)
        total = exps.sum(axis=-1, keepdims=True)
        out = exps / xp.where(total == 0, 1, total)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        inner = ctx.xp.sum(grad * out, axis=-1, keepdims=True)
        return out * (grad - inner)


def masked_softmax(x):
    """Return the softmax of ``x`` over its last axis, 0 where a row is all -inf."""
    return MaskedSoftmax.apply(x)


def causal_mask(query_len, key_len, device):
    """Return a bool (query_len, key_len) mask, True on and below the diagonal.

    Query i may attend to keys 0..i. When the lengths differ, the mask is
    aligned at the top-left corner, as PyTorch's ``is_causal`` is.
    """
    xp = device.xp
    with device:
        return make_tensor(xp.tril(xp.ones((query_len, key_len), dtype=bool)))


def mask_to_bias(mask, dtype, op):
    """Return ``mask`` as an additive float tensor: bool True -> 0, False -> -inf.

    A float mask is returned as it is (cast to ``dtype``), so a gradient can
    flow into it through the addition.
    """
    if mask.dtype.kind == "b":
        xp = ctx_xp(mask.data)
        with mask.device:
            bias = xp.where(mask.data, 0.0, -np.inf).astype(dtype)
        return make_tensor(bias)
    if mask.dtype.kind != "f":
        raise TypeError(
            f"{op}: attn_mask must be a bool or floating-point tensor, got "
            f"dtype {mask.dtype}. Build it with a comparison or .float()."
        )
    return mask if mask.dtype == dtype else mask.astype(dtype)


def _check_qkv(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"scaled_dot_product_attention: {name} must be a Tensor, got "
                f"{type(t).__name__}"
            )
        if t.ndim < 2:
            raise ValueError(
                f"scaled_dot_product_attention: {name} needs shape (..., length, "
                f"features), got {tuple(t.shape)}"
            )
        check_float("scaled_dot_product_attention", t)
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            "scaled_dot_product_attention: query and key must have the same "
            f"feature size, got query {tuple(query.shape)} and key "
            f"{tuple(key.shape)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            "scaled_dot_product_attention: key and value must have the same "
            f"length (axis -2), got key {tuple(key.shape)} and value "
            f"{tuple(value.shape)}"
        )


def _check_mask_shape(mask, query_len, key_len):
    try:
        np.broadcast_shapes(tuple(mask.shape), (query_len, key_len))
    except ValueError:
        raise ValueError(
            f"scaled_dot_product_attention: attn_mask of shape "
            f"{tuple(mask.shape)} does not broadcast to the scores' last two "
            f"axes ({query_len}, {key_len}) (queries, keys)"
        ) from None


def _repeat_heads(t, groups):
    """Repeat each head of (..., H, S, E) ``groups`` times along axis -3."""
    if groups == 1:
        return t
    shape = tuple(t.shape)
    expanded = t.unsqueeze(-3).expand(*shape[:-2], groups, *shape[-2:])
    return expanded.reshape(*shape[:-3], shape[-3] * groups, *shape[-2:])


def _group_heads(query, key, value):
    batched = query.ndim >= 3 and key.ndim >= 3 and value.ndim >= 3
    q_heads = query.shape[-3] if batched else 0
    kv_heads = key.shape[-3] if batched else 0
    if not batched or kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(
            "scaled_dot_product_attention: enable_gqa needs (..., heads, "
            "length, features) inputs whose query heads are a multiple of the "
            f"key heads, got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    groups = q_heads // kv_heads
    return _repeat_heads(key, groups), _repeat_heads(value, groups)


def attention_weights(query, key, attn_mask=None, dropout_p=0.0,
                      is_causal=False, scale=None):
    """Return the (..., L, S) attention weights softmax(q k^T * scale + mask).

    The arguments are those of ``scaled_dot_product_attention``, after its
    checks. Dropout is applied to the weights whenever ``dropout_p`` > 0.
    """
    query_len, key_len = query.shape[-2], key.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    scores = (query @ key.mT) * scale
    if is_causal:
        attn_mask = causal_mask(query_len, key_len, query.device)
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            attn_mask = as_tensor(attn_mask, device=query.device)
        _check_mask_shape(attn_mask, query_len, key_len)
        bias = mask_to_bias(attn_mask, scores.dtype, "scaled_dot_product_attention")
        scores = scores + bias
    weights = masked_softmax(scores)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p, training=True)
    return weights


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """Return softmax(query @ key^T * scale + mask) @ value.

    ``query`` is (..., L, E), ``key`` (..., S, E) and ``value`` (..., S, Ev).
    The leading axes broadcast, and the result is (..., L, Ev). ``scale``
    defaults to 1/sqrt(E).

    ``attn_mask`` broadcasts to (..., L, S): a bool mask is True where a
    query may attend to a key, and a float mask is added to the scores.
    ``is_causal=True`` lets query i attend to keys 0..i and excludes
    ``attn_mask``. Dropout with probability ``dropout_p`` is applied to the
    weights whenever ``dropout_p`` > 0, so pass 0.0 outside training.
    ``enable_gqa=True`` repeats each key and value head to match the query
    heads (axis -3), for grouped-query attention.

    A query whose keys are all masked out returns a row of zeros, and no NaN
    reaches any gradient, as PyTorch 2.13's implementation does.

    >>> q = gf.randn(2, 4, 5, 8)  # (batch, heads, length, features)
    >>> gf.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).shape
    (2, 4, 5, 8)
    """
    _check_qkv(query, key, value)
    dropout_p = check_dropout_p("scaled_dot_product_attention", dropout_p)
    if is_causal and attn_mask is not None:
        raise ValueError(
            "scaled_dot_product_attention: pass either attn_mask or "
            "is_causal=True, not both. To use both, combine the causal mask "
            "into attn_mask yourself."
        )
    if enable_gqa:
        key, value = _group_heads(query, key, value)
    weights = attention_weights(query, key, attn_mask, dropout_p, is_causal, scale)
    return weights @ value


def _padding_bias(mask, dtype, name):
    """Return a module-style mask (bool True = blocked) as an additive float tensor."""
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"MultiheadAttention: {name} must be a Tensor, got {type(mask).__name__}"
        )
    if mask.dtype.kind == "b":
        xp = ctx_xp(mask.data)
        with mask.device:
            return make_tensor(xp.where(mask.data, -np.inf, 0.0).astype(dtype))
    if mask.dtype.kind != "f":
        raise TypeError(
            f"MultiheadAttention: {name} must be a bool or floating-point "
            f"tensor, got dtype {mask.dtype}"
        )
    return mask if mask.dtype == dtype else mask.astype(dtype)


def _append_column(bias):
    """Append one zero (attend-allowed) key column to an additive mask."""
    if bias is None:
        return None
    column = zeros(*bias.shape[:-1], 1, dtype=bias.dtype, device=bias.device)
    return _ops.cat([bias, column], axis=-1)


class MultiheadAttention(Module):
    """Multi-head attention with PyTorch's parameters, masks and layouts.

    ``forward(query, key, value)`` takes (L, N, E) query and (S, N, kdim) /
    (S, N, vdim) key and value, or (N, L, E) and so on with
    ``batch_first=True``, or unbatched (L, E). It returns
    ``(attn_output, attn_weights)``: the output has the query's layout, and
    the weights are (N, L, S) averaged over heads, (N, num_heads, L, S) with
    ``average_attn_weights=False``, or None with ``need_weights=False``.

    Masks follow ``torch.nn.MultiheadAttention``: a bool ``attn_mask``
    ((L, S) or (N * num_heads, L, S)) or ``key_padding_mask`` ((N, S)) is
    True where attending is *not* allowed, and a float one is added to the
    scores. ``is_causal=True`` without ``attn_mask`` applies a causal mask
    (PyTorch 2.13 requires the mask to be passed as well). ``dropout`` is
    applied to the attention weights in training mode, and the returned
    weights include it.

    NOTE: a query whose keys are all masked gets zero weights, so its output
    is ``out_proj.bias``. PyTorch 2.13 returns the same with
    ``need_weights=False`` but NaN with ``need_weights=True``.

    The weights are ``in_proj_weight`` (3E, E) and ``in_proj_bias`` (3E,),
    or ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight`` when kdim
    or vdim differs from E, plus ``out_proj`` (a Linear) and, with
    ``add_bias_kv``, ``bias_k`` and ``bias_v`` of shape (1, 1, E).

    >>> mha = gf.nn.MultiheadAttention(8, 2, batch_first=True)
    >>> x = gf.randn(3, 5, 8)
    >>> out, weights = mha(x, x, x)
    >>> out.shape, weights.shape
    ((3, 5, 8), (3, 5, 5))
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True,
                 add_bias_kv=False, add_zero_attn=False, kdim=None, vdim=None,
                 batch_first=False, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                "MultiheadAttention: embed_dim must be a positive multiple of "
                f"num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        self.embed_dim = int(embed_dim)
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = int(num_heads)
        self.head_dim = embed_dim // num_heads
        self.dropout = check_dropout_p("MultiheadAttention", dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        self._make_parameters(bias, add_bias_kv, device, dtype)
        self._reset_parameters()

    def _make_parameters(self, bias, add_bias_kv, device, dtype):
        def parameter(*shape):
            return Parameter(empty(*shape, device=device, dtype=dtype))

        embed = self.embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = parameter(3 * embed, embed)
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = parameter(embed, embed)
            self.k_proj_weight = parameter(embed, self.kdim)
            self.v_proj_weight = parameter(embed, self.vdim)
        if bias:
            self.in_proj_bias = parameter(3 * embed)
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed, embed, bias=bias, device=device, dtype=dtype)
        if add_bias_kv:
            self.bias_k = parameter(1, 1, embed)
            self.bias_v = parameter(1, 1, embed)
        else:
            self.bias_k = self.bias_v = None

    def _reset_parameters(self):
        if self._qkv_same_embed_dim:
            init.xavier_uniform_(self.in_proj_weight)
        else:
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            init.xavier_normal_(self.bias_k)
            init.xavier_normal_(self.bias_v)

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        batched = self._check_inputs(query, key, value)
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)
        bias = self._mask_bias(attn_mask, key_padding_mask, is_causal, q, k)
        q, k, v, bias = self._extend_keys(q, k, v, bias)
        dropout_p = self.dropout if self.training else 0.0
        weights = attention_weights(q, k, bias, dropout_p)
        out = self._merge_heads(weights @ v)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(axis=1)
        return out, (weights if batched else weights.squeeze(0))

    def _check_inputs(self, query, key, value):
        for name, t, size in (("query", query, self.embed_dim),
                              ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"MultiheadAttention: {name} must be a Tensor, got "
                    f"{type(t).__name__}"
                )
            self._check_layout(name, t, size, query)
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                "MultiheadAttention: key and value must agree in every axis but "
                f"the last, got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        return query.ndim == 3

    def _check_layout(self, name, t, size, query):
        if t.ndim not in (2, 3):
            raise ValueError(
                f"MultiheadAttention: {name} must be 3-D (batched) or 2-D "
                f"(unbatched), got shape {tuple(t.shape)}"
            )
        if t.ndim != query.ndim:
            raise ValueError(
                f"MultiheadAttention: {name} of shape {tuple(t.shape)} must have "
                f"as many axes as query of shape {tuple(query.shape)}"
            )
        if t.shape[-1] != size:
            option = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[name]
            raise ValueError(
                f"MultiheadAttention: {name} must have {size} features ({option}) "
                f"in its last axis, got shape {tuple(t.shape)} with "
                f"{t.shape[-1]}. Project the input to {size} features or build "
                f"the module with {option}={t.shape[-1]}."
            )

    def _project(self, query, key, value):
        """Return the (N, length, E) projections of batch-first inputs."""
        if self._qkv_same_embed_dim:
            weights = _ops.chunk(self.in_proj_weight, 3, axis=0)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3
        if self.in_proj_bias is not None:
            biases = _ops.chunk(self.in_proj_bias, 3, axis=0)
        projected = []
        for x, weight, bias in zip((query, key, value), weights, biases):
            out = x @ weight.T
            projected.append(out if bias is None else out + bias)
        return projected

    def _mask_bias(self, attn_mask, key_padding_mask, is_causal, q, k):
        """Return one additive (N, heads, L, S)-broadcastable mask, or None."""
        batch, query_len, key_len = q.shape[0], q.shape[1], k.shape[1]
        bias = None
        if attn_mask is not None:
            bias = _padding_bias(attn_mask, q.dtype, "attn_mask")
            bias = self._heads_mask(bias, batch, query_len, key_len)
        elif is_causal:
            bias = mask_to_bias(causal_mask(query_len, key_len, q.device), q.dtype,
                                "MultiheadAttention")
        if key_padding_mask is not None:
            padding = _padding_bias(key_padding_mask, q.dtype, "key_padding_mask")
            if tuple(padding.shape) != (batch, key_len):
                raise ValueError(
                    "MultiheadAttention: key_padding_mask must have shape "
                    f"(N, S) = {(batch, key_len)}, got {tuple(padding.shape)}"
                )
            padding = padding.reshape(batch, 1, 1, key_len)
            bias = padding if bias is None else bias + padding
        return bias

    def _heads_mask(self, bias, batch, query_len, key_len):
        heads = self.num_heads
        if tuple(bias.shape) == (query_len, key_len):
            return bias
        if tuple(bias.shape) == (batch * heads, query_len, key_len):
            return bias.reshape(batch, heads, query_len, key_len)
        raise ValueError(
            f"MultiheadAttention: attn_mask must have shape (L, S) = "
            f"{(query_len, key_len)} or (N * num_heads, L, S) = "
            f"{(batch * heads, query_len, key_len)}, got {tuple(bias.shape)}"
        )

    def _extend_keys(self, q, k, v, bias):
        """Append bias_k/bias_v and the zero key, then split into heads."""
        batch = q.shape[0]
        if self.bias_k is not None:
            k = _ops.cat([k, self.bias_k.expand(batch, 1, self.embed_dim)], axis=1)
            v = _ops.cat([v, self.bias_v.expand(batch, 1, self.embed_dim)], axis=1)
            bias = _append_column(bias)
        q, k, v = (self._split_heads(t) for t in (q, k, v))
        if self.add_zero_attn:
            shape = (batch, self.num_heads, 1, self.head_dim)
            zero = zeros(*shape, dtype=k.dtype, device=k.device)
            k = _ops.cat([k, zero], axis=2)
            v = _ops.cat([v, zero], axis=2)
            bias = _append_column(bias)
        return q, k, v, bias

    def _split_heads(self, t):
        batch, length = t.shape[0], t.shape[1]
        t = t.reshape(batch, length, self.num_heads, self.head_dim)
        return t.transpose(1, 2)

    def _merge_heads(self, t):
        batch, length = t.shape[0], t.shape[2]
        return t.transpose(1, 2).reshape(batch, length, self.embed_dim)
