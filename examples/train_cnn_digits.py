"""Train a small CNN on scikit-learn's bundled 8x8 digits and report test accuracy.

The data set (1797 grey-scale images, 10 classes) ships with scikit-learn,
so this runs offline:

    python examples/train_cnn_digits.py            # 12 epochs on the CPU
    python examples/train_cnn_digits.py --device auto --epochs 20

It holds out a stratified 20 % of the images for the test set.
"""

import argparse
import time

import numpy as np

import gradflow as gf
from gradflow import nn

from _common import evaluate, load_digits_split, train_epoch


def build_model():
    """Return the CNN: two 3x3 convolution blocks, then a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),     # (N, 16, 8, 8)
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),                    # (N, 32, 4, 4)
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),            # (N, 64, 2, 2)
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 10),
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the initial weights and shuffling")
    parser.add_argument("--device", default="cpu",
                        help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use only this many training images (for smoke tests)")
    return parser.parse_args(argv)


def main(argv=None):
    """Train and evaluate; return a dict with the accuracies, losses and time."""
    args = parse_args(argv)
    device = gf.device(args.device)
    gf.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_x, train_y, test_x, test_y = load_digits_split(args.seed, args.train_limit)
    model = build_model().to(device)
    optimizer = gf.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        # Batch norm needs two samples per channel in training, so a last
        # batch of one image is skipped.
        losses.append(train_epoch(model, optimizer, train_x, train_y,
                                  args.batch_size, rng, device, min_batch_size=2))
        print(f"epoch {epoch:2d}  train loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - started
    results = {
        "train_accuracy": evaluate(model, train_x, train_y, device),
        "test_accuracy": evaluate(model, test_x, test_y, device),
        "losses": losses,
        "seconds": seconds,
    }
    print(f"train accuracy {results['train_accuracy']:.4f}, test accuracy "
          f"{results['test_accuracy']:.4f} ({len(test_x)} test images), "
          f"training took {seconds:.1f} s on {device}")
    return results


if __name__ == "__main__":
    main()
