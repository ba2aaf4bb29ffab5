"""The same workloads written for each contender: gradflow, PyTorch, HIPS autograd,
MyGrad, DeZero, and bare NumPy (the floor of the MLP step).

Each ``build_<workload>`` function returns a zero-argument callable that runs
one repetition of the workload; bench_framework.py times those callables in
one worker process per contender. A contender that is not installed raises
ImportError, and the driver reports it as missing.
"""

import math
import time

import numpy as np

CHAIN_LENGTH = 100
MLP_DEPTH, MLP_WIDTH, MLP_BATCH = 32, 512, 256


def _chain_numpy_like(x, ops):
    # 100 ops alternating unary and binary, on shape (4,): what per-op
    # overhead is made of. Values stay bounded so no contender hits inf.
    y = x
    for i in range(CHAIN_LENGTH // 2):
        y = ops["tanh"](y)
        y = y * 0.9 if i % 2 else y + 0.1
    return ops["sum"](y)


# -- gradflow -----------------------------------------------------------------

def gradflow_workloads():
    import gradflow as gf

    ops = {"tanh": gf.tanh, "sum": gf.sum}

    def chain():
        x = gf.tensor(np.linspace(-1, 1, 4), dtype=gf.float32, requires_grad=True)

        def run():
            x.grad = None
            _chain_numpy_like(x, ops).backward()

        return run

    def chain_no_grad():
        x = gf.tensor(np.linspace(-1, 1, 4), dtype=gf.float32)

        def run():
            with gf.no_grad():
                _chain_numpy_like(x, ops)

        return run

    def broadcast():
        a = gf.randn(64, 1, requires_grad=True)
        b = gf.randn(1, 64, requires_grad=True)

        def run():
            a.grad = b.grad = None
            (a + b).sum().backward()

        return run

    def scaling(steps):
        def build():
            x = gf.tensor([0.5], requires_grad=True)

            def run():
                x.grad = None
                y = x
                for _ in range(steps):
                    y = (y * 0.5 + y * 0.5)  # fan-out then fan-in
                y.sum().backward()

            return run

        return build

    def mlp(activation):
        def build():
            gf.manual_seed(0)
            layers = []
            for _ in range(MLP_DEPTH):
                layers.append(gf.nn.Linear(MLP_WIDTH, MLP_WIDTH))
                layers.append(gf.nn.GELU() if activation == "gelu" else gf.nn.ReLU())
            model = gf.nn.Sequential(*layers)
            opt = gf.optim.Adam(model.parameters(), lr=1e-4)
            x = gf.randn(MLP_BATCH, MLP_WIDTH)
            return _mlp_step(lambda: model(x).mean(), opt)

        return build

    return {
        "chain": chain, "chain_no_grad": chain_no_grad, "broadcast": broadcast,
        "scaling_1e4": scaling(10_000), "scaling_1e5": scaling(100_000),
        "mlp_gelu": mlp("gelu"), "mlp_relu": mlp("relu"),
    }


def _mlp_step(loss_fn, opt):
    """Return one training step that records its phase times in ``run.phases``."""

    def run():
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn()
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        opt.step()
        run.phases = (forward_end - start, backward_end - forward_end,
                      time.perf_counter() - backward_end)

    return run


# -- PyTorch ------------------------------------------------------------------

def torch_workloads():
    import torch

    ops = {"tanh": torch.tanh, "sum": torch.sum}

    def chain():
        x = torch.linspace(-1, 1, 4, requires_grad=True)

        def run():
            x.grad = None
            _chain_numpy_like(x, ops).backward()

        return run

    def chain_no_grad():
        x = torch.linspace(-1, 1, 4)

        def run():
            with torch.no_grad():
                _chain_numpy_like(x, ops)

        return run

    def broadcast():
        a = torch.randn(64, 1, requires_grad=True)
        b = torch.randn(1, 64, requires_grad=True)

        def run():
            a.grad = b.grad = None
            (a + b).sum().backward()

        return run

    def scaling(steps):
        def build():
            x = torch.tensor([0.5], requires_grad=True)

            def run():
                x.grad = None
                y = x
                for _ in range(steps):
                    y = (y * 0.5 + y * 0.5)
                y.sum().backward()

            return run

        return build

    def mlp(activation):
        def build():
            torch.manual_seed(0)
            layers = []
            for _ in range(MLP_DEPTH):
                layers.append(torch.nn.Linear(MLP_WIDTH, MLP_WIDTH))
                layers.append(torch.nn.GELU() if activation == "gelu" else torch.nn.ReLU())
            model = torch.nn.Sequential(*layers)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            x = torch.randn(MLP_BATCH, MLP_WIDTH)
            return _mlp_step(lambda: model(x).mean(), opt)

        return build

    return {
        "chain": chain, "chain_no_grad": chain_no_grad, "broadcast": broadcast,
        "scaling_1e4": scaling(10_000), "scaling_1e5": scaling(100_000),
        "mlp_gelu": mlp("gelu"), "mlp_relu": mlp("relu"),
    }


# -- HIPS autograd ----------------------------------------------------------------

def autograd_workloads():
    import autograd
    import autograd.numpy as anp

    ops = {"tanh": anp.tanh, "sum": anp.sum}
    grad_chain = autograd.grad(lambda x: _chain_numpy_like(x, ops))

    def chain():
        x = np.linspace(-1, 1, 4).astype(np.float32)
        return lambda: grad_chain(x)

    def chain_no_grad():
        x = np.linspace(-1, 1, 4).astype(np.float32)
        return lambda: _chain_numpy_like(x, {"tanh": np.tanh, "sum": np.sum})

    def broadcast():
        a = np.random.randn(64, 1).astype(np.float32)
        b = np.random.randn(1, 64).astype(np.float32)
        g = autograd.grad(lambda a, b: anp.sum(a + b), argnum=(0, 1))
        return lambda: g(a, b)

    def scaling(steps):
        def build():
            def f(x):
                y = x
                for _ in range(steps):
                    y = y * 0.5 + y * 0.5
                return anp.sum(y)

            g = autograd.grad(f)
            x = np.array([0.5], dtype=np.float32)
            return lambda: g(x)

        return build

    def mlp(activation):
        def build():
            rng = np.random.default_rng(0)
            bound = 1 / math.sqrt(MLP_WIDTH)
            params = [
                (rng.uniform(-bound, bound, (MLP_WIDTH, MLP_WIDTH)).astype(np.float32),
                 rng.uniform(-bound, bound, MLP_WIDTH).astype(np.float32))
                for _ in range(MLP_DEPTH)
            ]
            x = rng.standard_normal((MLP_BATCH, MLP_WIDTH)).astype(np.float32)

            from autograd.scipy.special import erf

            def act(h):
                if activation == "relu":
                    return anp.maximum(h, 0)
                return 0.5 * h * (1 + erf(h * (1 / math.sqrt(2))))

            def loss(params):
                h = x
                for w, b in params:
                    h = act(h @ w.T + b)
                return anp.mean(h)

            grad_fn = autograd.grad(loss)
            adam = _NumpyAdam(params)

            def run():
                adam.step(params, grad_fn(params))

            return run

        return build

    return {
        "chain": chain, "chain_no_grad": chain_no_grad, "broadcast": broadcast,
        "scaling_1e4": scaling(10_000), "scaling_1e5": scaling(100_000),
        "mlp_gelu": mlp("gelu"), "mlp_relu": mlp("relu"),
    }


class _NumpyAdam:
    """Adam over nested lists of NumPy arrays, for the contenders without one."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        flat = [p for pair in params for p in pair]
        self.m = [np.zeros_like(p) for p in flat]
        self.v = [np.zeros_like(p) for p in flat]

    def step(self, params, grads):
        # In place wherever NumPy allows, as a careful hand-written step would
        # be: fresh temporaries of this size cost page faults on every step.
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1**self.t)
        correction = math.sqrt(1 - b2**self.t)
        flat = [p for pair in params for p in pair]
        flat_grads = [g for pair in grads for g in pair]
        for p, g, m, v in zip(flat, flat_grads, self.m, self.v):
            m += (1 - b1) * (g - m)
            v *= b2
            v += (1 - b2) * g * g
            denom = np.sqrt(v)
            denom /= correction
            denom += self.eps
            p -= step_size * m / denom


# -- MyGrad -------------------------------------------------------------------------

def mygrad_workloads():
    import mygrad as mg

    ops = {"tanh": mg.tanh, "sum": mg.sum}

    def chain():
        x = mg.tensor(np.linspace(-1, 1, 4).astype(np.float32))

        def run():
            _chain_numpy_like(x, ops).backward()

        return run

    def chain_no_grad():
        x = mg.tensor(np.linspace(-1, 1, 4).astype(np.float32))

        def run():
            with mg.no_autodiff:
                _chain_numpy_like(x, ops)

        return run

    def broadcast():
        a = mg.tensor(np.random.randn(64, 1).astype(np.float32))
        b = mg.tensor(np.random.randn(1, 64).astype(np.float32))
        return lambda: mg.sum(a + b).backward()

    def scaling(steps):
        def build():
            x = mg.tensor(np.array([0.5], dtype=np.float32))

            def run():
                y = x
                for _ in range(steps):
                    y = y * 0.5 + y * 0.5
                mg.sum(y).backward()

            return run

        return build

    return {
        "chain": chain, "chain_no_grad": chain_no_grad, "broadcast": broadcast,
        "scaling_1e4": scaling(10_000), "scaling_1e5": scaling(100_000),
    }


# -- DeZero -------------------------------------------------------------------------

def dezero_workloads():
    # DeZero 0.0.13 (its latest release) still uses np.int, which NumPy 1.24
    # removed; restoring the alias is the only change it needs to import.
    if not hasattr(np, "int"):
        np.int = int
    import dezero
    import dezero.functions as DF

    ops = {"tanh": DF.tanh, "sum": DF.sum}

    def chain():
        x = dezero.Variable(np.linspace(-1, 1, 4).astype(np.float32))

        def run():
            x.cleargrad()
            _chain_numpy_like(x, ops).backward()

        return run

    def chain_no_grad():
        x = dezero.Variable(np.linspace(-1, 1, 4).astype(np.float32))

        def run():
            with dezero.no_grad():
                _chain_numpy_like(x, ops)

        return run

    def broadcast():
        a = dezero.Variable(np.random.randn(64, 1).astype(np.float32))
        b = dezero.Variable(np.random.randn(1, 64).astype(np.float32))

        def run():
            a.cleargrad()
            b.cleargrad()
            DF.sum(a + b).backward()

        return run

    def scaling(steps):
        def build():
            x = dezero.Variable(np.array([0.5], dtype=np.float32))

            def run():
                x.cleargrad()
                y = x
                for _ in range(steps):
                    y = y * 0.5 + y * 0.5
                DF.sum(y).backward()

            return run

        return build

    return {
        "chain": chain, "chain_no_grad": chain_no_grad, "broadcast": broadcast,
        "scaling_1e4": scaling(10_000), "scaling_1e5": scaling(100_000),
    }


# -- bare NumPy: the floor of the MLP step ------------------------------------------

def numpy_workloads():
    def mlp(activation):
        def build():
            rng = np.random.default_rng(0)
            bound = 1 / math.sqrt(MLP_WIDTH)
            ws = [rng.uniform(-bound, bound, (MLP_WIDTH, MLP_WIDTH)).astype(np.float32)
                  for _ in range(MLP_DEPTH)]
            bs = [rng.uniform(-bound, bound, MLP_WIDTH).astype(np.float32)
                  for _ in range(MLP_DEPTH)]
            x = rng.standard_normal((MLP_BATCH, MLP_WIDTH)).astype(np.float32)
            adam = _NumpyAdam(list(zip(ws, bs)))
            gelu = _numpy_gelu if activation == "gelu" else _numpy_relu

            def forward():
                h, cache = x, []
                for w, b in zip(ws, bs):
                    z = h @ w.T
                    z += b
                    h_out, slope = gelu(z)
                    cache.append((h, slope))
                    h = h_out
                return h, cache

            def run():
                start = time.perf_counter()
                h, cache = forward()
                forward_end = time.perf_counter()
                g = np.full_like(h, 1.0 / h.size)
                grads = []
                for (h_in, slope), w in zip(reversed(cache), reversed(ws)):
                    g = g * slope
                    grads.append((g.T @ h_in, g.sum(axis=0)))
                    g = g @ w
                grads.reverse()
                backward_end = time.perf_counter()
                adam.step(list(zip(ws, bs)), grads)
                run.phases = (forward_end - start, backward_end - forward_end,
                              time.perf_counter() - backward_end)

            return run

        return build

    return {"mlp_gelu": mlp("gelu"), "mlp_relu": mlp("relu")}


def _numpy_relu(z):
    return np.maximum(z, 0), (z > 0).astype(z.dtype)


def _numpy_gelu(z):
    # The exact (erf) GELU and its derivative, as gradflow's nn.GELU computes.
    from scipy.special import erf

    cdf = 0.5 * (1 + erf(z * (1 / math.sqrt(2))))
    pdf = np.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    return z * cdf, cdf + z * pdf


CONTENDERS = {
    "gradflow": gradflow_workloads,
    "gradflow-openblas": gradflow_workloads,
    "torch": torch_workloads,
    "autograd": autograd_workloads,
    "mygrad": mygrad_workloads,
    "dezero": dezero_workloads,
    "numpy": numpy_workloads,
}

# Environment that a contender's worker process starts with. gradflow
# multiplies through MKL when the mkl wheel is installed; the second
# gradflow contender keeps NumPy's OpenBLAS, which a plain install uses.
CONTENDER_ENV = {"gradflow-openblas": {"GRADFLOW_BLAS": "numpy"}}
