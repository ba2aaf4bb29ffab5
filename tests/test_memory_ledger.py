"""gf.memory: the ledger of saved arrays and the allocator peak."""

import numpy as np
import pytest

import gradflow as gf


def test_linear_gelu_exact_bytes():
    gf.manual_seed(0)
    model = gf.nn.Sequential(gf.nn.Linear(8, 16), gf.nn.GELU(),
                             gf.nn.Linear(16, 4), gf.nn.GELU())
    x = gf.randn(5, 8)
    with gf.memory.Ledger() as ledger:
        y = model(x)
    # Activations: GELU 1 saves its input (5x16), Linear 2 saves GELU 1's
    # output (5x16), GELU 2 saves its input (5x4); float32 is 4 bytes.
    assert ledger.activation_bytes == (5 * 16 + 5 * 16 + 5 * 4) * 4
    # Leaf memory: x (for the first weight's gradient) and the second weight
    # (for the gradient of its input). The first weight is not kept, since x
    # needs no gradient.
    assert ledger.leaf_bytes == (5 * 8 + 4 * 16) * 4
    assert y.shape == (5, 4)


def test_backward_frees_everything():
    model = gf.nn.Sequential(gf.nn.Linear(4, 4), gf.nn.GELU())
    with gf.memory.Ledger() as ledger:
        model(gf.randn(3, 4)).sum().backward()
    assert ledger.activation_bytes == 0
    assert ledger.peak_activation_bytes == 3 * 4 * 4


def test_shared_array_counted_once():
    x = gf.randn(6, 6, requires_grad=True)
    with gf.memory.Ledger() as ledger:
        h = x * 2.0
        a = h * h          # saves h twice
        b = h.sin()        # saves h again
        v = h.reshape(36)  # a view of h
        c = v.cos()        # saves the view
    assert ledger.activation_bytes == 36 * 4
    assert (a, b, c) is not None


def test_released_by_dropping_graph():
    x = gf.randn(10, requires_grad=True)
    with gf.memory.Ledger() as ledger:
        y = (x * 3.0).exp()
        held = ledger.activation_bytes
        del y
    assert held == 10 * 4
    assert ledger.activation_bytes == 0


def test_attribute_arrays_counted():
    x = gf.randn(4, 5, requires_grad=True)
    index = np.array([0, 2, 2, 3])
    with gf.memory.Ledger() as ledger:
        h = x * 1.0
        picked = h[index]
        dropped = gf.nn.functional.dropout(h, p=0.5)
    ops = {row.op for row in ledger.records()}
    assert {"GetItem", "Dropout"} <= ops
    # The index array (int64) and the float32 dropout mask.
    assert ledger.activation_bytes == index.nbytes + 4 * 5 * 4
    assert picked.shape == (4, 5)
    assert dropped.shape == (4, 5)


def test_attribute_bytes_only_attributes():
    x = gf.randn(4, 5, requires_grad=True)
    index = np.array([0, 2, 2, 3])
    with gf.memory.Ledger() as ledger:
        h = x * 1.0
        picked = h[index]
        dropped = gf.nn.functional.dropout(h, p=0.5)
    # GetItem keeps its index in an attribute; Dropout saves its mask.
    assert ledger.attribute_bytes == index.nbytes
    assert picked.shape == dropped.shape


@pytest.mark.parametrize("layer", [gf.nn.Dropout(0.5), gf.nn.MaxPool2d(2)],
                         ids=["dropout", "max_pool"])
def test_backward_frees_layer_arrays(layer):
    x = gf.randn(2, 3, 8, 8, requires_grad=True)
    with gf.memory.Ledger() as ledger:
        y = layer(x * 1.0)
        held = ledger.activation_bytes
        y.sum().backward()
        # y still holds the graph, so only what backward frees is gone.
        assert y.grad_fn is not None
        assert ledger.activation_bytes == 0
    assert held > 0


def test_record_rows_describe_arrays():
    x = gf.randn(3, 2, dtype=gf.float64, requires_grad=True)
    with gf.memory.Ledger() as ledger:
        y = (x * 2.0).sin()
    rows = [r for r in ledger.records() if not r.leaf]
    assert [(r.op, r.shape, str(r.dtype), r.device, r.bytes) for r in rows] == [
        ("Sin", (3, 2), "float64", "cpu", 48)
    ]
    assert rows[0].where is None
    assert y.shape == (3, 2)


def test_stack_names_user_line():
    x = gf.randn(3, requires_grad=True)
    with gf.memory.Ledger(stack=True) as ledger:
        y = x.exp()
    (row,) = ledger.records()
    assert "test_memory_ledger.py" in row.where
    assert "test_stack_names_user_line" in row.where
    assert y.shape == (3,)


def test_no_hook_outside_ledger():
    from gradflow.autograd import _function

    with gf.memory.Ledger():
        pass
    assert _function.record_hooks == []
    assert _function.release_hooks == []


def test_reset_peak():
    x = gf.randn(100, requires_grad=True)
    with gf.memory.Ledger() as ledger:
        y = x.exp()
        y.sum().backward()
        ledger.reset_peak()
        z = (x * 1.0).sin()
    assert ledger.peak_activation_bytes == 400
    assert z.shape == (100,)


def test_checkpoint_keeps_only_input():
    model = gf.nn.Sequential(*[gf.nn.Linear(8, 8) for _ in range(3)], gf.nn.GELU())
    h = gf.randn(4, 8, requires_grad=True) * 1.0
    with gf.memory.Ledger() as ledger:
        y = gf.checkpoint(model, h)
    assert ledger.activation_bytes == 4 * 8 * 4
    assert y.requires_grad


def test_selective_recipe_counts_shared_array():
    w = gf.randn(16, 16, requires_grad=True)
    x = gf.randn(4, 16)
    with gf.memory.Ledger() as ledger:
        y = gf.checkpoint(lambda t: gf.gelu(t @ w) @ w, x,
                          policy=gf.checkpoint.Policy())
        # The GELU saves the product, and the second product's recipe for the
        # GELU output contains that same array, so it counts once.
        assert ledger.activation_bytes == 4 * 16 * 4
        matmul = y.grad_fn
        recomputed = matmul.saved_tensors[0]
        assert ledger.activation_bytes == 2 * 4 * 16 * 4
        del recomputed
        assert ledger.activation_bytes == 4 * 16 * 4


def test_cpu_peak_measures_block():
    with gf.memory.peak() as p:
        a = np.ones(1_000_000, dtype=np.float64)
        del a
    assert 8_000_000 <= p.peak_bytes < 9_000_000


def test_cpu_peak_reset():
    with gf.memory.peak() as p:
        a = np.ones(1_000_000)
        del a
        p.reset()
        b = np.ones(1000)
    assert p.peak_bytes < 100_000
    assert b.size == 1000


@pytest.mark.skipif(not gf.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak():
    device = gf.device("cuda")
    with gf.memory.peak(device) as p:
        a = gf.ones(1 << 20, device=device)
        del a
    assert p.peak_bytes >= 4 << 20
