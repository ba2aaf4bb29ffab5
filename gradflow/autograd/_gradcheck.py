"""Gradient checks against central finite differences."""

import numpy as np

from . import _api

__all__ = ["gradcheck", "numerical_jacobian"]


def _host(array):
    return array if isinstance(array, np.ndarray) else array.get()


def _evaluate(fn, inputs):
    out = fn(*inputs)
    return out if isinstance(out, (list, tuple)) else (out,)


def numerical_jacobian(fn, inputs, index, eps):
    """Return d(outputs)/d(inputs[index]) by central differences, row per input element.

    The result has shape (input size, total output size), on the host.
    """
    target = inputs[index]
    flat = target.data.reshape(-1)
    if isinstance(flat, np.ndarray) and flat.size and not np.shares_memory(
            flat, target.data):
        raise ValueError(
            f"gradcheck: input {index} is not contiguous; pass a contiguous "
            "copy (t.clone()) so it can be perturbed in place."
        )
    columns = []
    # Evaluated with recording on, so fn may itself call gf.grad (a check of
    # second-order gradients); the graphs built here are simply dropped.
    for k in range(flat.size):
        original = flat[k].item()
        flat[k] = original + eps
        plus = [_host(o.data).ravel().astype(np.float64) for o in _evaluate(fn, inputs)]
        flat[k] = original - eps
        minus = [_host(o.data).ravel().astype(np.float64) for o in _evaluate(fn, inputs)]
        flat[k] = original
        columns.append(
            np.concatenate([(p - m) / (2 * eps) for p, m in zip(plus, minus)])
        )
    if not columns:
        # An empty input gives no rows, but the width must still be the total
        # output size, to match the analytical Jacobian.
        total = sum(o.data.size for o in _evaluate(fn, inputs))
        return np.zeros((0, total))
    return np.stack(columns)


def _analytical_jacobian(fn, inputs, checked):
    from .._tensor import make_tensor

    outputs = [o for o in _evaluate(fn, inputs)]
    sizes = [o.data.size for o in outputs]
    total = sum(sizes)
    rows = {i: np.zeros((inputs[i].data.size, total)) for i in checked}
    offset = 0
    for o, size in zip(outputs, sizes):
        if not o.requires_grad:
            offset += size
            continue
        xp = np if isinstance(o.data, np.ndarray) else __import__("cupy")
        for k in range(size):
            seed = xp.zeros(o.data.size, dtype=o.dtype)
            seed[k] = 1
            grads = _api.grad(
                [o], [inputs[i] for i in checked],
                grad_outputs=[make_tensor(seed.reshape(o.shape))],
                retain_graph=True, allow_unused=True,
            )
            for i, g in zip(checked, grads):
                if g is not None:
                    rows[i][:, offset + k] = _host(g.data).ravel()
        offset += size
    return rows


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=True):
    """Compare the gradients of ``fn`` at ``inputs`` with finite differences.

    ``inputs`` is a Tensor or a sequence of them; every one that requires
    grad is checked. Use float64 inputs: in float32 the differences are
    dominated by rounding. Returns True, or raises (or returns False with
    ``raise_exception=False``) naming the first input whose gradient is off.

    >>> x = gf.randn(3, dtype=gf.float64, requires_grad=True)
    >>> gf.gradcheck(lambda t: (t * t).sum(), x)
    True
    """
    from .._tensor import Tensor

    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad, so there is nothing to check")
    for i in checked:
        if inputs[i].dtype != np.float64:
            import warnings

            warnings.warn(
                f"gradcheck: input {i} is {inputs[i].dtype}; finite differences "
                "are only reliable in float64.", UserWarning, stacklevel=2,
            )
    analytical = _analytical_jacobian(fn, inputs, checked)
    for i in checked:
        numerical = numerical_jacobian(fn, inputs, i, eps)
        exact = analytical[i]
        if numerical.shape != exact.shape or not np.allclose(
            exact, numerical, atol=atol, rtol=rtol
        ):
            diff = np.abs(exact - numerical).max() if numerical.shape == exact.shape else None
            message = (
                f"gradcheck: the gradient of input {i} (shape "
                f"{tuple(inputs[i].shape)}) does not match finite differences; "
                f"max abs difference {diff}.\nanalytical:\n{exact}\n"
                f"numerical:\n{numerical}"
            )
            if raise_exception:
                raise AssertionError(message)
            return False
    return True
