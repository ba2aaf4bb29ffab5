"""Shared fixtures and helpers: the device every device-aware test runs on,
fixed seeds, host copies of arrays and a loader for the example scripts."""

import importlib.util
import os
import pathlib
import sys


def _real_gpu_usable():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CuPy missing, no driver, or a broken CUDA install
        return False


# Without a GPU the CUDA kernels run under Numba's simulator. Numba reads
# this variable once, at its first import, so it is set before anything
# imports numba; an explicit setting from the environment wins.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _real_gpu_usable():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
# The tests launch kernels on tiny arrays on purpose; on a real GPU Numba
# would warn about low occupancy, and warnings are errors here.
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gradflow as gf  # noqa: E402


def _device_params():
    reason = "no usable CUDA device (CuPy missing, no driver or no GPU)"
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda", id="cuda",
            marks=pytest.mark.skipif(not gf.cuda.is_available(), reason=reason),
        ),
    ]


@pytest.fixture(params=_device_params())
def device(request):
    """Each test that takes ``device`` runs on the CPU and, when usable, on CUDA."""
    return gf.device(request.param)


@pytest.fixture
def python_path():
    """Run the test with gradflow's C extension switched off (the Python path)."""
    from gradflow import _fastpath

    with _fastpath.enabled(False):
        yield


@pytest.fixture(params=["c", "python"])
def both_paths(request):
    """Run the test once through the C extension and once through Python.

    Without the extension both runs take the Python path.
    """
    from gradflow import _fastpath

    with _fastpath.enabled(request.param == "c"):
        yield request.param


@pytest.fixture(autouse=True)
def _fixed_seeds():
    gf.manual_seed(0)
    np.random.seed(0)


def to_host(value):
    """Return a gradflow Tensor or array as a NumPy array."""
    if isinstance(value, gf.Tensor):
        value = value.data
    return value if isinstance(value, np.ndarray) else value.get()


def float64_leaf(array, device):
    """Return ``array`` as a float64 tensor on ``device`` that requires grad."""
    return gf.tensor(array, dtype=gf.float64, device=device, requires_grad=True)


def match_torch(gf_fn, torch_fn, arrays, constants, device, rtol=1e-7, atol=1e-9):
    """Check the output and the gradient of every float input against PyTorch.

    ``arrays`` are differentiable float64 inputs. ``constants`` (integer
    targets and the like) pass to both sides unchanged, after the arrays.
    """
    torch = pytest.importorskip("torch")
    ours = [float64_leaf(a, device) for a in arrays]
    theirs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    our_constants = [gf.tensor(c, device=device) for c in constants]
    their_constants = [torch.tensor(c) for c in constants]
    out = gf_fn(*ours, *our_constants)
    expected = torch_fn(*theirs, *their_constants)
    np.testing.assert_allclose(to_host(out), expected.detach().numpy(), rtol, atol)
    seed = np.random.default_rng(1).standard_normal(expected.shape)
    out.backward(gf.tensor(seed, dtype=gf.float64, device=device))
    expected.backward(torch.tensor(seed))
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(
            to_host(mine.grad), reference.grad.numpy(), rtol, atol
        )


def device_tensor(array, device, requires_grad=False):
    """Return ``array`` as a tensor on ``device``, keeping its dtype."""
    return gf.tensor(array, device=device, requires_grad=requires_grad)


def load_torch_state(module, torch_module):
    """Copy the state_dict of a PyTorch module into the gradflow ``module``."""
    state = torch_module.state_dict()
    module.load_state_dict({n: gf.tensor(p.numpy()) for n, p in state.items()})


def assert_close(actual, expected, tol=1e-10):
    """Assert that a gradflow Tensor or array equals ``expected`` to ``tol``."""
    np.testing.assert_allclose(to_host(actual), expected, rtol=tol, atol=tol)


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    """Import examples/NAME.py as a new module and return it.

    examples/ is on sys.path while the script runs its imports, as it is when
    the script is run as ``python examples/NAME.py``, so ``_common`` resolves.
    """
    path = str(EXAMPLES)
    sys.path.insert(0, path)
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(path)
    return module


def assert_matches_torch(gf_fn, torch_fn, x, grad_out, device, atol):
    """Assert that ``gf_fn`` and ``torch_fn`` agree on ``x`` in forward and backward.

    Both outputs are backpropagated with ``grad_out``, which is an array or a
    function of the output shape that returns one. It is called after the
    gradflow forward. The outputs and the gradients of ``x`` must match to
    ``atol``.
    """
    torch = pytest.importorskip("torch")
    x_gf = gf.tensor(x, device=device, requires_grad=True)
    out = gf_fn(x_gf)
    if callable(grad_out):
        grad_out = grad_out(out.shape)
    out.backward(gf.tensor(grad_out, device=device))
    x_torch = torch.tensor(x, requires_grad=True)
    expected = torch_fn(x_torch)
    expected.backward(torch.tensor(grad_out))
    np.testing.assert_allclose(to_host(out.detach()), expected.detach().numpy(),
                               atol=atol)
    np.testing.assert_allclose(to_host(x_gf.grad), x_torch.grad.numpy(), atol=atol)
