"""Pretrain a CNN, freeze everything but its last layer, and fine-tune that layer.

Pretraining uses only the digits 0-4 of scikit-learn's bundled 8x8 digits.
Fine-tuning then trains a fresh 10-class head on all ten digits on top of
the frozen convolutional features. The script checks that every frozen
parameter still has ``grad is None`` and holds exactly its pretrained
values, and exits with an error if not:

    python examples/finetune_frozen.py
"""

import argparse

import numpy as np

import gradflow as gf
from gradflow import nn

from _common import evaluate, load_digits_split, train_epoch


def build_model():
    """Return a small CNN whose last module, ``model[-1]``, is the classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),                  # (N, 16, 4, 4)
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),                  # (N, 32, 2, 2)
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )


def train(model, optimizer, images, labels, epochs, batch_size, rng, device):
    """Train with cross-entropy on shuffled mini-batches.

    Returns the mean loss of the last epoch.
    """
    for _ in range(epochs):
        loss = train_epoch(model, optimizer, images, labels, batch_size, rng, device)
    return loss


def freeze_all_but_last(model):
    """Turn off gradients outside ``model[-1]``, and return copies of those values."""
    frozen = {}
    for name, param in model.named_parameters():
        if not name.startswith(f"{len(model) - 1}."):
            param.requires_grad_(False)
            frozen[name] = param.detach().cpu().numpy().copy()
    return frozen


def check_frozen(model, frozen):
    """Raise RuntimeError unless each frozen parameter has no grad and is unchanged."""
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        param = params[name]
        if param.grad is not None:
            raise RuntimeError(f"frozen parameter {name} received a gradient")
        if not np.array_equal(param.detach().cpu().numpy(), before):
            raise RuntimeError(f"frozen parameter {name} changed during fine-tuning")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=8,
                        help="epochs on the digits 0-4")
    parser.add_argument("--finetune-epochs", type=int, default=8,
                        help="epochs of the new head on all digits")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per optimizer step")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the initial weights and shuffling")
    parser.add_argument("--device", default="cpu",
                        help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use only this many training images (for smoke tests)")
    return parser.parse_args(argv)


def main(argv=None):
    """Pretrain, freeze, fine-tune and check; return a dict of accuracies and counts."""
    args = parse_args(argv)
    device = gf.device(args.device)
    gf.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_x, train_y, test_x, test_y = load_digits_split(args.seed, args.train_limit)
    first_half = train_y < 5

    model = build_model().to(device)
    optimizer = gf.optim.Adam(model.parameters(), lr=3e-3)
    train(model, optimizer, train_x[first_half], train_y[first_half],
          args.pretrain_epochs, args.batch_size, rng, device)
    pretrained = evaluate(model, test_x[test_y < 5], test_y[test_y < 5], device)
    print(f"pretrained on digits 0-4: test accuracy {pretrained:.4f} on 0-4")

    frozen = freeze_all_but_last(model)
    model[-1].reset_parameters()
    # All parameters go to the optimizer: SGD skips those whose grad is None,
    # so the frozen ones must stay unchanged even with weight decay set.
    optimizer = gf.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                             weight_decay=1e-4)
    loss = train(model, optimizer, train_x, train_y, args.finetune_epochs,
                 args.batch_size, rng, device)
    check_frozen(model, frozen)
    results = {
        "pretrain_accuracy": pretrained,
        "finetune_loss": loss,
        "test_accuracy": evaluate(model, test_x, test_y, device),
        "unseen_accuracy": evaluate(model, test_x[test_y >= 5], test_y[test_y >= 5],
                                    device),
        "frozen_parameters": len(frozen),
        "trainable_parameters": sum(p.requires_grad for p in model.parameters()),
    }
    print(f"fine-tuned head: test accuracy {results['test_accuracy']:.4f} on all "
          f"digits, {results['unseen_accuracy']:.4f} on 5-9")
    print(f"checked: {len(frozen)} frozen parameters have grad None and kept "
          "their pretrained values")
    return results


if __name__ == "__main__":
    main()
