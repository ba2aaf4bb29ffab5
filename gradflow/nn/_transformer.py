"""The Transformer encoder block (self-attention and an MLP, each with a residual)."""

from .. import _ops
from ._attention import MultiheadAttention
from ._layers import Dropout, Linear, ModuleList
from ._module import Module
from ._norm import LayerNorm

__all__ = ["TransformerEncoderLayer", "TransformerEncoder"]

_ACTIVATIONS = {"relu": _ops.relu, "gelu": _ops.gelu}


def _activation(value):
    if callable(value):
        return value
    if value in _ACTIVATIONS:
        return _ACTIVATIONS[value]
    raise ValueError(
        "TransformerEncoderLayer: activation must be 'relu', 'gelu' or a "
        f"callable, got {value!r}"
    )


class TransformerEncoderLayer(Module):
    """One encoder block: self-attention, then a two-layer MLP, each residual.

    Post-norm by default, as in PyTorch and the original Transformer:
    x = norm1(x + attn(x)), then x = norm2(x + mlp(x)). With
    ``norm_first=True`` it is pre-norm: x = x + attn(norm1(x)), then
    x = x + mlp(norm2(x)), which trains more stably in deep stacks.

    The submodules have PyTorch's names (``self_attn``, ``linear1``,
    ``linear2``, ``norm1``, ``norm2``, ``dropout``, ``dropout1``,
    ``dropout2``), so a state_dict of ``torch.nn.TransformerEncoderLayer``
    loads unchanged. ``src`` is (L, N, d_model), (N, L, d_model) with
    ``batch_first=True``, or unbatched (L, d_model). ``src_mask`` and
    ``src_key_padding_mask`` follow ``MultiheadAttention`` (bool True means
    blocked), and ``is_causal=True`` without ``src_mask`` applies a causal
    mask.

    >>> layer = gf.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32,
    ...                                       batch_first=True)
    >>> layer(gf.randn(2, 5, 16)).shape
    (2, 5, 16)
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1,
                 activation="relu", layer_norm_eps=1e-5, batch_first=False,
                 norm_first=False, bias=True, device=None, dtype=None):
        super().__init__()
        self._config = dict(
            d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward,
            dropout=dropout, activation=activation, layer_norm_eps=layer_norm_eps,
            batch_first=batch_first, norm_first=norm_first, bias=bias,
            device=device, dtype=dtype,
        )
        placement = dict(device=device, dtype=dtype)
        self.self_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
            **placement,
        )
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, **placement)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **placement)
        self.norm_first = bool(norm_first)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **placement)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **placement)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = _activation(activation)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._attention_block(self.norm1(x), src_mask,
                                          src_key_padding_mask, is_causal)
            return x + self._mlp_block(self.norm2(x))
        x = self.norm1(x + self._attention_block(x, src_mask, src_key_padding_mask,
                                                 is_causal))
        return self.norm2(x + self._mlp_block(x))

    def _attention_block(self, x, attn_mask, key_padding_mask, is_causal):
        out, _ = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            need_weights=False, is_causal=is_causal,
        )
        return self.dropout1(out)

    def _mlp_block(self, x):
        hidden = self.dropout(self.activation(self.linear1(x)))
        return self.dropout2(self.linear2(hidden))

    def clone(self):
        """Return a deep copy: same settings, weights, dtype, device and mode."""
        import copy

        return copy.deepcopy(self)


class TransformerEncoder(Module):
    """A stack of ``num_layers`` copies of ``encoder_layer``, then ``norm``.

    Each copy starts from the weights of ``encoder_layer`` (as PyTorch's
    deep copies do) and trains on its own. The layers live in ``layers``,
    so the state_dict keys match PyTorch's (``layers.0.self_attn...``).
    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)``
    passes the masks to every layer.

    >>> layer = gf.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    >>> gf.nn.TransformerEncoder(layer, num_layers=2)(gf.randn(2, 5, 16)).shape
    (2, 5, 16)
    """

    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        if not isinstance(encoder_layer, TransformerEncoderLayer):
            raise TypeError(
                "TransformerEncoder: encoder_layer must be a "
                f"TransformerEncoderLayer, got {type(encoder_layer).__name__}"
            )
        self.layers = ModuleList([encoder_layer.clone() for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=bool(is_causal))
        return x if self.norm is None else self.norm(x)
