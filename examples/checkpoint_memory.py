"""Train a deep MLP on the digits with gradient checkpointing, and show the trade-off.

The data is scikit-learn's bundled digits set (8x8 images, no download). The
model is an input layer, ``--depth`` residual blocks x + GELU(Linear(x)) and
a classifier (the skip connections let a deep stack train without
normalization). With ``--checkpoint-segments N`` (N >= 2) the blocks run
through ``gf.checkpoint_sequential`` in N segments, so backward recomputes
all segments but the last instead of keeping their activations.

    python examples/checkpoint_memory.py --checkpoint-segments 4
    python examples/checkpoint_memory.py --checkpoint-segments 1   # no checkpointing

Set OPENBLAS_NUM_THREADS=1 on a busy machine with few cores: there, BLAS
threads that compete with other processes can slow each step many times.

Before training, the script measures one training step both without
checkpointing and with the requested segments: the peak of activation bytes
the tape keeps (``gf.memory.Ledger``) and the step time. At the end it
prints the test accuracy.
"""

import argparse
import time

import numpy as np

import gradflow as gf

from _common import load_digits_split


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint-segments", type=int, default=4,
                        help="segments for checkpoint_sequential, where 1 "
                             "turns checkpointing off (default: 4)")
    parser.add_argument("--depth", type=int, default=16,
                        help="hidden residual blocks (default: 16)")
    parser.add_argument("--hidden", type=int, default=128,
                        help="width of the hidden blocks (default: 128)")
    parser.add_argument("--epochs", type=int, default=8,
                        help="passes over the training set (default: 8)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="examples per optimizer step (default: 128)")
    args = parser.parse_args(argv)
    if not 1 <= args.checkpoint_segments <= args.depth:
        parser.error("--checkpoint-segments must be between 1 and --depth")
    return args


class ResidualBlock(gf.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.linear = gf.nn.Linear(hidden, hidden)

    def forward(self, x):
        return x + gf.gelu(self.linear(x))


class DeepMLP(gf.nn.Module):
    def __init__(self, depth, hidden, segments):
        super().__init__()
        self.segments = segments
        self.stem = gf.nn.Linear(64, hidden)
        self.blocks = gf.nn.Sequential(*[ResidualBlock(hidden) for _ in range(depth)])
        self.head = gf.nn.Linear(hidden, 10)

    def forward(self, x):
        h = self.stem(x)
        if self.segments > 1 and self.training:
            h = gf.checkpoint_sequential(self.blocks, self.segments, h)
        else:
            h = self.blocks(h)
        return self.head(h)


def measure_step(model, x, y):
    """Return (peak activation bytes, seconds) of one forward and backward."""
    with gf.memory.Ledger() as ledger:
        gf.nn.functional.cross_entropy(model(x), y).backward()
    start = time.perf_counter()
    gf.nn.functional.cross_entropy(model(x), y).backward()
    return ledger.peak_activation_bytes, time.perf_counter() - start


def report_tradeoff(model, x, y):
    requested = model.segments
    model.segments = 1
    plain_bytes, plain_seconds = measure_step(model, x, y)
    model.segments = requested
    bytes_, seconds = measure_step(model, x, y)
    model.zero_grad()
    print(f"no checkpointing:  peak activations {plain_bytes / 2**20:6.2f} MiB, "
          f"step {plain_seconds * 1e3:6.1f} ms")
    print(f"{requested} segment(s):      peak activations {bytes_ / 2**20:6.2f} MiB "
          f"({bytes_ / plain_bytes:.2f}x), step {seconds * 1e3:6.1f} ms "
          f"({seconds / plain_seconds:.2f}x)")


def main(argv=None):
    args = parse_args(argv)
    gf.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits_split(0, flatten=True)
    x_train, y_train = gf.tensor(x_train), gf.tensor(y_train)
    model = DeepMLP(args.depth, args.hidden, args.checkpoint_segments)
    optimizer = gf.optim.Adam(model.parameters(), lr=1e-3)
    report_tradeoff(model, x_train[: args.batch_size], y_train[: args.batch_size])
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = gf.randperm(len(x_train))
        for first in range(0, len(x_train), args.batch_size):
            index = order[first:first + args.batch_size]
            loss = gf.nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with gf.no_grad():
        predicted = model(gf.tensor(x_test)).argmax(axis=1).numpy()
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s; "
          f"test accuracy {np.mean(predicted == y_test) * 100:.1f} %")


if __name__ == "__main__":
    main()
