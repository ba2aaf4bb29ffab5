"""Show that accumulating gradients over micro-batches matches one large batch.

Two copies of one CNN start from the same weights. One takes SGD steps on
batches of 60 digits. The other splits each batch into four micro-batches
(16, 16, 16 and 12 images), calls ``backward`` on each, and steps once.
The gradients add up across ``backward`` calls, so the two match when each
micro-batch's mean loss is weighted by its share of the batch
(size / batch size; 1/4 for equal parts). The script checks, in float64,
that gradients and parameters agree to 1e-10 after every step:

    python examples/grad_accumulation.py
"""

import argparse

import numpy as np

import gradflow as gf
from gradflow import nn

from _common import load_digits_split

TOLERANCE = 1e-10
MICRO_BATCH_SIZES = (16, 16, 16, 12)


def build_model(seed, device):
    """Return a float64 CNN with the initial weights that ``seed`` selects."""
    gf.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),              # (N, 8, 4, 4)
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    return model.double().to(device)


def full_batch_step(model, optimizer, x, y):
    """Take one SGD step on the whole batch; return the loss."""
    loss = nn.CrossEntropyLoss()(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def accumulated_step(model, optimizer, x, y, sizes):
    """Accumulate gradients over micro-batches of ``sizes``, then step once."""
    loss_fn = nn.CrossEntropyLoss()
    optimizer.zero_grad()
    total = 0.0
    start = 0
    for size in sizes:
        part = slice(start, start + size)
        # Each mean loss counts by its share of the batch, so the summed
        # gradients equal the gradient of the mean over the whole batch.
        loss = loss_fn(model(x[part]), y[part]) * (size / len(x))
        loss.backward()
        total += loss.item()
        start += size
    optimizer.step()
    return total


def unweighted_gradient_ratio(seed, device, x, y):
    """Return |grad| of summed unweighted micro-batch losses over |grad| of the batch.

    Without the size / batch-size weights the micro-batch gradients add up
    to about len(MICRO_BATCH_SIZES) times the batch gradient.
    """
    norms = []
    for weighted in (False, True):
        model = build_model(seed, device)
        start = 0
        for size in MICRO_BATCH_SIZES:
            part = slice(start, start + size)
            loss = nn.CrossEntropyLoss()(model(x[part]), y[part])
            (loss * (size / len(x)) if weighted else loss).backward()
            start += size
        squares = sum(float((p.grad * p.grad).sum().item()) for p in model.parameters())
        norms.append(squares ** 0.5)
    return norms[0] / norms[1]


def max_difference(model_a, model_b, attribute):
    """Return the largest absolute difference of parameters or their gradients."""
    largest = 0.0
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        value_a, value_b = (a.grad, b.grad) if attribute == "grad" else (a, b)
        diff = np.abs(value_a.detach().cpu().numpy() - value_b.detach().cpu().numpy())
        largest = max(largest, float(diff.max()))
    return largest


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights and the batches")
    parser.add_argument("--device", default="cpu",
                        help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    return parser.parse_args(argv)


def main(argv=None):
    """Compare the two training runs step by step; return the differences."""
    args = parse_args(argv)
    device = gf.device(args.device)
    images, labels, _, _ = load_digits_split(args.seed)
    batch_size = sum(MICRO_BATCH_SIZES)
    large, accumulated = build_model(args.seed, device), build_model(args.seed, device)
    optimizers = [gf.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9)
                  for m in (large, accumulated)]

    rng = np.random.default_rng(args.seed)
    grad_diffs, param_diffs = [], []
    for step in range(args.steps):
        index = rng.choice(len(images), batch_size, replace=False)
        x = gf.tensor(images[index].astype(np.float64), device=device)
        y = gf.tensor(labels[index], device=device)
        loss = full_batch_step(large, optimizers[0], x, y)
        accumulated_loss = accumulated_step(accumulated, optimizers[1], x, y,
                                            MICRO_BATCH_SIZES)
        grad_diffs.append(max_difference(large, accumulated, "grad"))
        param_diffs.append(max_difference(large, accumulated, "param"))
        print(f"step {step + 1}: loss {loss:.6f} vs {accumulated_loss:.6f}, max "
              f"gradient difference {grad_diffs[-1]:.1e}, max parameter "
              f"difference {param_diffs[-1]:.1e}")

    ratio = unweighted_gradient_ratio(args.seed, device, x, y)
    print(f"without the weights the accumulated gradient is {ratio:.2f} times too "
          "large")

    worst = max(grad_diffs + param_diffs)
    if worst > TOLERANCE:
        raise RuntimeError(
            f"accumulated gradients differ from the large batch by {worst:.3e}, "
            f"more than the tolerance {TOLERANCE:.0e}"
        )
    print(f"checked: {len(MICRO_BATCH_SIZES)} accumulated micro-batches match one "
          f"batch of {batch_size} within {TOLERANCE:.0e} for {args.steps} steps")
    return {"grad_differences": grad_diffs, "param_differences": param_diffs,
            "tolerance": TOLERANCE, "unweighted_ratio": ratio}


if __name__ == "__main__":
    main()
