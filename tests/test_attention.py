"""Scaled dot-product attention, MultiheadAttention and the Transformer block."""

import numpy as np
import pytest
from conftest import assert_close, device_tensor, load_torch_state, to_host

import gradflow as gf
import gradflow.nn.functional as F


# -- scaled_dot_product_attention -------------------------------------------

SDPA_CASES = {
    "plain": dict(shapes=[(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7)]),
    "causal": dict(shapes=[(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7)], is_causal=True),
    "bool_mask": dict(shapes=[(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7)], mask="bool"),
    "float_mask": dict(shapes=[(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7)], mask="float"),
    "scale": dict(shapes=[(3, 4, 5), (3, 6, 5), (3, 6, 2)], scale=0.3),
    "gqa": dict(shapes=[(2, 4, 3, 5), (2, 2, 6, 5), (2, 2, 6, 5)], enable_gqa=True),
}


def _sdpa_mask(kind, rng, query_len, key_len):
    allowed = rng.random((query_len, key_len)) > 0.4
    allowed[1] = False  # one query with every key masked
    if kind == "bool":
        return allowed
    return np.where(allowed, rng.standard_normal(allowed.shape), -np.inf)


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_matches_torch(case, device):
    torch = pytest.importorskip("torch")
    spec = dict(SDPA_CASES[case])
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in spec.pop("shapes")]
    kind = spec.pop("mask", None)
    torch_kwargs, gf_kwargs = dict(spec), dict(spec)
    if kind:
        mask = _sdpa_mask(kind, rng, arrays[0].shape[-2], arrays[1].shape[-2])
        torch_kwargs["attn_mask"] = torch.tensor(mask)
        gf_kwargs["attn_mask"] = device_tensor(mask, device)
    torch_in = [torch.tensor(a, requires_grad=True) for a in arrays]
    gf_in = [device_tensor(a, device, requires_grad=True) for a in arrays]
    torch_sdpa = torch.nn.functional.scaled_dot_product_attention
    expected = torch_sdpa(*torch_in, **torch_kwargs)
    out = F.scaled_dot_product_attention(*gf_in, **gf_kwargs)
    weight = rng.standard_normal(tuple(expected.shape))
    (expected * torch.tensor(weight)).sum().backward()
    (out * device_tensor(weight, device)).sum().backward()
    assert_close(out, expected.detach().numpy())
    for name, mine, theirs in zip("qkv", gf_in, torch_in):
        assert_close(mine.grad, theirs.grad.numpy())


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_gradcheck(kind, device):
    rng = np.random.default_rng(1)
    q, k, v = (device_tensor(rng.standard_normal(s), device, requires_grad=True)
               for s in [(2, 3, 4), (2, 5, 4), (2, 5, 3)])
    mask = device_tensor(_sdpa_mask(kind, rng, 3, 5), device,
                         requires_grad=kind == "float")

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    assert gf.gradcheck(attend, [q, k, v, mask])


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_fully_masked_row(kind, device):
    rng = np.random.default_rng(2)
    q, k, v = (device_tensor(rng.standard_normal(s), device, requires_grad=True)
               for s in [(3, 4), (5, 4), (5, 2)])
    mask = _sdpa_mask(kind, rng, 3, 5)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=device_tensor(mask, device))
    out.sum().backward()
    assert np.array_equal(to_host(out)[1], np.zeros(2))
    for t in (q, k, v):
        assert np.isfinite(to_host(t.grad)).all()
    assert np.array_equal(to_host(q.grad)[1], np.zeros(4))


def test_sdpa_causal_mask_values(device):
    q = gf.randn(1, 4, 3, device=device)
    out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    allowed = device_tensor(np.tril(np.ones((4, 4), dtype=bool)), device)
    masked = F.scaled_dot_product_attention(q, q, q, attn_mask=allowed)
    assert_close(out, to_host(masked))
    assert_close(out[:, 0], to_host(q[:, 0]), tol=1e-6)


def test_sdpa_double_backward(device):
    rng = np.random.default_rng(3)
    q, k, v = (device_tensor(rng.standard_normal((3, 2)), device, requires_grad=True)
               for _ in range(3))

    def grad_norm(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        (dq,) = gf.grad((out * out).sum(), [q], create_graph=True)
        return (dq * dq).sum()

    assert gf.gradcheck(grad_norm, [q, k, v])


def test_sdpa_dropout_seeded(device):
    q = gf.randn(2, 5, 4, device=device)
    gf.manual_seed(7)
    first = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    gf.manual_seed(7)
    second = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    plain = F.scaled_dot_product_attention(q, q, q)
    assert np.array_equal(to_host(first), to_host(second))
    assert not np.allclose(to_host(first), to_host(plain))


def test_sdpa_dropout_one_zeroes_output(device):
    q = gf.randn(2, 5, 4, device=device)
    out = F.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    assert np.array_equal(to_host(out), np.zeros((2, 5, 4)))


def test_sdpa_rejects_mask_and_causal(device):
    q = gf.randn(3, 4, device=device)
    mask = device_tensor(np.ones((3, 3), dtype=bool), device)
    with pytest.raises(ValueError, match="is_causal"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True)


def test_sdpa_rejects_bad_shapes(device):
    q, k = gf.randn(3, 4, device=device), gf.randn(5, 4, device=device)
    with pytest.raises(ValueError, match="feature size"):
        F.scaled_dot_product_attention(q, gf.randn(5, 3, device=device), k)
    with pytest.raises(ValueError, match="same length"):
        F.scaled_dot_product_attention(q, k, gf.randn(4, 4, device=device))
    with pytest.raises(ValueError, match="does not broadcast"):
        mask = device_tensor(np.ones((3, 4), dtype=bool), device)
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask)


def test_sdpa_gqa_rejects_bad_heads(device):
    q = gf.randn(1, 3, 4, 5, device=device)
    k = gf.randn(1, 2, 4, 5, device=device)
    with pytest.raises(ValueError, match="multiple"):
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        F.scaled_dot_product_attention(q[0, 0], k[0, 0], k[0, 0], enable_gqa=True)


def test_sdpa_rejects_integer_mask(device):
    q = gf.randn(3, 4, device=device)
    with pytest.raises(TypeError, match="bool or floating"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=gf.ones(3, 3, dtype=gf.int64))


# -- MultiheadAttention -------------------------------------------------------

MHA_CASES = {
    "default": (dict(), dict(), [(4, 3, 8), (5, 3, 8), (5, 3, 8)], {}),
    "batch_first_per_head": (dict(batch_first=True), dict(average_attn_weights=False),
                             [(3, 4, 8), (3, 5, 8), (3, 5, 8)], {}),
    "kdim_vdim_no_bias": (dict(kdim=6, vdim=5, bias=False), dict(),
                          [(4, 3, 8), (5, 3, 6), (5, 3, 5)], {}),
    "bias_kv_zero_attn_masks": (
        dict(add_bias_kv=True, add_zero_attn=True), dict(),
        [(4, 3, 8), (5, 3, 8), (5, 3, 8)],
        {"attn_mask": "bool_ls", "key_padding_mask": "padding"}),
    "unbatched_float_mask": (dict(), dict(), [(4, 8), (5, 8), (5, 8)],
                             {"attn_mask": "float_hls"}),
    "no_weights_float_mask": (dict(), dict(need_weights=False),
                              [(4, 3, 8), (5, 3, 8), (5, 3, 8)],
                              {"attn_mask": "float_nhls"}),
    "causal": (dict(), dict(is_causal=True), [(4, 3, 8), (4, 3, 8), (4, 3, 8)],
               {"attn_mask": "causal"}),
}


def _mha_mask(kind, rng):
    if kind == "bool_ls":
        return rng.random((4, 5)) < 0.3
    if kind == "padding":
        return np.array([[0, 0, 1, 0, 1]] * 3, dtype=bool)
    if kind == "float_hls":
        return rng.standard_normal((2, 4, 5))
    if kind == "float_nhls":
        return rng.standard_normal((6, 4, 5))
    return np.triu(np.ones((4, 4), dtype=bool), 1)


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_matches_torch(case, device):
    torch = pytest.importorskip("torch")
    init_kwargs, call_kwargs, shapes, mask_kinds = MHA_CASES[case]
    rng = np.random.default_rng(4)
    reference = torch.nn.MultiheadAttention(8, 2, **init_kwargs).double()
    module = gf.nn.MultiheadAttention(8, 2, device=device, dtype=gf.float64,
                                      **init_kwargs)
    load_torch_state(module, reference)
    arrays = [rng.standard_normal(s) for s in shapes]
    masks = {name: _mha_mask(kind, rng) for name, kind in mask_kinds.items()}

    torch_in = [torch.tensor(a, requires_grad=True) for a in arrays]
    gf_in = [device_tensor(a, device, requires_grad=True) for a in arrays]
    expected, expected_weights = reference(
        *torch_in, **call_kwargs, **{n: torch.tensor(m) for n, m in masks.items()})
    out, weights = module(*gf_in, **call_kwargs,
                          **{n: device_tensor(m, device) for n, m in masks.items()})

    torch_loss = (expected * torch.tensor(np.cos(arrays[0]))).sum()
    gf_loss = (out * device_tensor(np.cos(arrays[0]), device)).sum()
    if expected_weights is not None:
        assert_close(weights, expected_weights.detach().numpy())
        torch_loss = torch_loss + (expected_weights ** 2).sum()
        gf_loss = gf_loss + (weights * weights).sum()
    else:
        assert weights is None
    torch_loss.backward()
    gf_loss.backward()

    assert_close(out, expected.detach().numpy())
    for mine, theirs in zip(gf_in, torch_in):
        assert_close(mine.grad, theirs.grad.numpy())
    for (name, param), (_, theirs) in zip(module.named_parameters(),
                                          reference.named_parameters()):
        assert_close(param.grad, theirs.grad.numpy())


def test_mha_parameter_names_match_torch():
    torch = pytest.importorskip("torch")
    for kwargs in (dict(), dict(kdim=3, vdim=5, add_bias_kv=True), dict(bias=False)):
        reference = torch.nn.MultiheadAttention(8, 2, **kwargs)
        module = gf.nn.MultiheadAttention(8, 2, **kwargs)
        theirs = {n: tuple(p.shape) for n, p in reference.state_dict().items()}
        mine = {n: tuple(p.shape) for n, p in module.state_dict().items()}
        assert mine == theirs


def test_mha_gradcheck(device):
    module = gf.nn.MultiheadAttention(4, 2, add_bias_kv=True, device=device,
                                      dtype=gf.float64)
    x = gf.randn(3, 1, 4, dtype=gf.float64, device=device, requires_grad=True)
    padding = device_tensor(np.array([[False, True, False]]), device)
    params = list(module.parameters())

    def attend(x, *params):
        out, weights = module(x, x, x, key_padding_mask=padding)
        return out, weights

    assert gf.gradcheck(attend, [x, *params])


def test_mha_fully_padded_query_is_finite(device):
    module = gf.nn.MultiheadAttention(4, 2, device=device, dtype=gf.float64)
    module.out_proj.bias.data[...] = module.out_proj.bias.data + 0.5
    x = gf.randn(3, 2, 4, dtype=gf.float64, device=device, requires_grad=True)
    padding = device_tensor(np.array([[True, True, True], [False, True, False]]),
                            device)
    out, weights = module(x, x, x, key_padding_mask=padding)
    (out.sum() + weights.sum()).backward()
    bias = to_host(module.out_proj.bias)
    assert_close(out[:, 0], np.broadcast_to(bias, (3, 4)))
    assert np.array_equal(to_host(weights)[0], np.zeros((3, 3)))
    assert np.isfinite(to_host(x.grad)).all()
    assert np.isfinite(to_host(module.in_proj_weight.grad)).all()


def test_mha_dropout_only_in_training(device):
    module = gf.nn.MultiheadAttention(4, 2, dropout=0.5, device=device)
    x = gf.randn(3, 2, 4, device=device)
    module.eval()
    first, _ = module(x, x, x)
    second, _ = module(x, x, x)
    module.train()
    dropped, _ = module(x, x, x)
    assert np.array_equal(to_host(first), to_host(second))
    assert not np.allclose(to_host(first), to_host(dropped))


def test_mha_rejects_bad_arguments(device):
    with pytest.raises(ValueError, match="multiple of num_heads"):
        gf.nn.MultiheadAttention(6, 4)
    module = gf.nn.MultiheadAttention(4, 2, device=device)
    x = gf.randn(3, 2, 4, device=device)
    with pytest.raises(ValueError, match="4 features"):
        module(gf.randn(3, 2, 5, device=device), x, x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        module(x, x, x, key_padding_mask=device_tensor(np.zeros((2, 4), bool), device))
    with pytest.raises(ValueError, match="attn_mask"):
        module(x, x, x, attn_mask=device_tensor(np.zeros((3, 4), bool), device))


def test_mha_feature_message(device):
    module = gf.nn.MultiheadAttention(8, 2, device=device)
    x = gf.randn(4, 2, 6, device=device)
    pattern = (r"query must have 8 features \(embed_dim\) in its last axis, got "
               r"shape \(4, 2, 6\)")
    with pytest.raises(ValueError, match=pattern):
        module(x, x, x)


def test_mha_key_feature_message(device):
    module = gf.nn.MultiheadAttention(8, 2, kdim=5, device=device)
    x = gf.randn(4, 2, 8, device=device)
    with pytest.raises(ValueError, match=r"key must have 5 features \(kdim\)"):
        module(x, x, x)


def test_mha_rejects_axis_count(device):
    module = gf.nn.MultiheadAttention(8, 2, device=device)
    x = gf.randn(4, 2, 8, device=device)
    pattern = r"query must be 3-D .* got shape \(1, 4, 2, 8\)"
    with pytest.raises(ValueError, match=pattern):
        module(x.unsqueeze(0), x, x)
    with pytest.raises(ValueError, match=r"key of shape \(2, 8\) must have as many"):
        module(x, x[0], x)


# -- Transformer block --------------------------------------------------------

LAYER_CASES = {
    "post_norm": dict(),
    "pre_norm_gelu_batch_first": dict(norm_first=True, activation="gelu",
                                      batch_first=True),
    "no_bias": dict(bias=False),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_encoder_layer_matches_torch(case, device):
    torch = pytest.importorskip("torch")
    kwargs = LAYER_CASES[case]
    reference = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, **kwargs)
    reference = reference.double()
    layer = gf.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, device=device,
                                          dtype=gf.float64, **kwargs)
    load_torch_state(layer, reference)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 8))
    length = 3 if kwargs.get("batch_first") else 4
    blocked = np.triu(np.ones((length, length), dtype=bool), 1)
    torch_x = torch.tensor(x, requires_grad=True)
    gf_x = device_tensor(x, device, requires_grad=True)
    expected = reference(torch_x, src_mask=torch.tensor(blocked))
    out = layer(gf_x, src_mask=device_tensor(blocked, device))
    (expected * torch.tensor(np.sin(x))).sum().backward()
    (out * device_tensor(np.sin(x), device)).sum().backward()
    assert_close(out, expected.detach().numpy())
    assert_close(gf_x.grad, torch_x.grad.numpy())
    for (name, param), (_, theirs) in zip(layer.named_parameters(),
                                          reference.named_parameters()):
        assert_close(param.grad, theirs.grad.numpy())


def test_encoder_stack_matches_torch(device):
    torch = pytest.importorskip("torch")
    torch_layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).double()
    reference = torch.nn.TransformerEncoder(torch_layer, 2, enable_nested_tensor=False)
    layer = gf.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, device=device,
                                          dtype=gf.float64)
    stack = gf.nn.TransformerEncoder(layer, 2)
    assert list(stack.state_dict()) == list(reference.state_dict())
    load_torch_state(stack, reference)
    x = np.random.default_rng(6).standard_normal((4, 3, 8))
    expected = reference(torch.tensor(x)).detach().numpy()
    assert_close(stack(device_tensor(x, device)), expected)


def test_encoder_layers_start_equal_train_apart(device):
    layer = gf.nn.TransformerEncoderLayer(8, 2, 16, device=device)
    stack = gf.nn.TransformerEncoder(layer, 2)
    first, second = stack.layers[0], stack.layers[1]
    assert_close(first.linear1.weight, to_host(second.linear1.weight), tol=0)
    assert first.linear1.weight is not second.linear1.weight


def test_encoder_layer_gradcheck(device):
    layer = gf.nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, norm_first=True,
                                          device=device, dtype=gf.float64)
    x = gf.randn(3, 1, 4, dtype=gf.float64, device=device, requires_grad=True)
    params = list(layer.parameters())

    def run(x, *params):
        return layer(x, is_causal=True)

    assert gf.gradcheck(run, [x, *params])


def test_encoder_layer_causal_flag_equals_mask(device):
    layer = gf.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                          device=device)
    x = gf.randn(2, 5, 8, device=device)
    blocked = device_tensor(np.triu(np.ones((5, 5), dtype=bool), 1), device)
    assert_close(layer(x, is_causal=True), to_host(layer(x, src_mask=blocked)),
                 tol=1e-6)


def test_encoder_layer_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        gf.nn.TransformerEncoderLayer(8, 2, activation="swish")



def test_encoder_copies_keep_dtype_and_mode():
    layer = gf.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16).double()
    layer.eval()
    encoder = gf.nn.TransformerEncoder(layer, 2)
    copy = encoder.layers[1]
    assert copy.linear1.weight.dtype == np.float64
    assert not copy.training
    assert copy.linear1.weight is not layer.linear1.weight
    assert np.array_equal(to_host(copy.linear1.weight), to_host(layer.linear1.weight))
