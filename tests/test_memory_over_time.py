"""Memory over time: training does not drift, dropped graphs die, long graphs scale."""

import gc
import sys
import tracemalloc
import weakref

import pytest

import gradflow as gf
from gradflow import nn
from test_training_state import SAMPLES, make_digits

# NOTE: the tolerance of the drift test. Under tracemalloc, allocations made
# in NumPy 2.4's reductions (np.sum, np.cumsum) grow and then level off, as
# small bounded caches would while their entries are replaced (observed in
# tracemalloc's tracebacks, not read in NumPy's source). This loop grew by
# up to about 38 KiB over its first 1,000 traced steps and by about 5 KiB
# over the next 1,000 (2-core x86 machine, Python 3.11), so the test
# measures the second traced window. A
# leak of one Tensor or one small array per step (at least ~56 bytes each)
# adds at least 55 KiB over 1,000 steps, so 32 KiB catches any per-step leak
# of a whole object.
DRIFT_TOLERANCE = 32 * 1024


def _train_steps(model, optimizer, images, labels, steps):
    for _ in range(steps):
        index = gf.randperm(SAMPLES)[:16]
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _traced_bytes():
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_training_memory_is_flat():
    images, labels = make_digits()
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    optimizer = gf.optim.Adam(model.parameters(), lr=1e-3)
    # 3,000 steps in all: 900 untraced, 1,000 traced, 1,000 traced and measured.
    _train_steps(model, optimizer, images, labels, 900)  # state and caches settle
    tracemalloc.start()
    try:
        # Traced warm-up: arrays that each step replaces (parameters, Adam
        # moments, gradients) and NumPy's cache entries are re-allocated
        # under tracing here, so they count in both measurements below.
        _train_steps(model, optimizer, images, labels, 1000)
        start = _traced_bytes()
        _train_steps(model, optimizer, images, labels, 1000)
        growth = _traced_bytes() - start
    finally:
        tracemalloc.stop()
    assert growth < DRIFT_TOLERANCE, f"grew by {growth} bytes over 1000 steps"


def test_grad_create_graph_collected():
    x = gf.randn(5, dtype=gf.float64, requires_grad=True)
    (g,) = gf.grad((x**3).sum(), x, create_graph=True)
    output, record = weakref.ref(g), weakref.ref(g.grad_fn)
    gc.disable()
    try:
        del g  # the graph has no cycles, so reference counting frees it
        assert output() is None
        assert record() is None
    finally:
        gc.enable()


def test_backward_create_graph_collected():
    x = gf.randn(5, dtype=gf.float64, requires_grad=True)
    (x**3).sum().backward(create_graph=True)
    # x.grad's graph leads back to x, a cycle that only the collector frees.
    output, record = weakref.ref(x.grad), weakref.ref(x.grad.grad_fn)
    del x
    gc.collect()
    assert output() is None
    assert record() is None


def _chain(length):
    x = gf.ones(1, dtype=gf.float64, requires_grad=True)
    y = x
    for _ in range(length):
        y = -y  # the cheapest recorded op
    return x, y


def test_long_chain_backward():
    assert sys.getrecursionlimit() < 100_000
    x, y = _chain(100_000)
    y.sum().backward()
    assert x.grad.item() == 1.0  # an even number of negations


def _peak_bytes(length):
    gc.collect()
    tracemalloc.start()
    try:
        x, y = _chain(length)
        y.sum().backward()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_chain_memory_is_linear():
    small, large = _peak_bytes(1_000), _peak_bytes(4_000)
    # Proportional memory gives a ratio of 4; a quadratic cost would give 16.
    assert small > 0
    assert large / small == pytest.approx(4.0, rel=0.15)
