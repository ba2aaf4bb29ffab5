"""Helpers shared by the example scripts: the digits data, a training epoch,
and the character-level text models' vocabulary, loss, logging and sampling.

The scripts import this module as ``_common``, which works when a script is
run as ``python examples/NAME.py`` (Python puts examples/ on sys.path) and
when a test puts examples/ on sys.path before importing one.
"""

import pathlib
import time

import numpy as np

import gradflow as gf
import gradflow.nn.functional as F
from gradflow import nn

TEMPEST = pathlib.Path(__file__).parent / "data" / "tempest.txt"


# -- scikit-learn's 8x8 digits ------------------------------------------------


def load_digits_split(seed, train_limit=None, flatten=False):
    """Return (train_x, train_y, test_x, test_y) of scikit-learn's 8x8 digits.

    The images are float32 scaled to [0, 1], of shape (N, 1, 8, 8), or (N, 64)
    with ``flatten``. The labels are int64. A stratified 20 % is the test set,
    and ``seed`` selects the split. ``train_limit`` keeps only that many
    training images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values of this set are integers from 0 to 16.
    if flatten:
        images = (digits.data / 16.0).astype(np.float32)
    else:
        images = (digits.images / 16.0).astype(np.float32)[:, None]
    split = train_test_split(images, digits.target, test_size=0.2,
                             random_state=seed, stratify=digits.target)
    train_x, test_x, train_y, test_y = split
    if train_limit is not None:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


def evaluate(model, images, labels, device, batch_size=256):
    """Return the accuracy of ``model`` on ``images`` in eval mode."""
    model.eval()
    correct = 0
    with gf.no_grad():
        for start in range(0, len(images), batch_size):
            batch = gf.tensor(images[start:start + batch_size], device=device)
            predicted = model(batch).argmax(axis=1).cpu().numpy()
            correct += int((predicted == labels[start:start + batch_size]).sum())
    model.train()
    return correct / len(images)


def train_epoch(model, optimizer, images, labels, batch_size, rng, device,
                min_batch_size=1):
    """Run one epoch of shuffled cross-entropy mini-batches and return the mean loss.

    A final batch smaller than ``min_batch_size`` is skipped, but the mean
    still divides by ``len(images)``.
    """
    loss_fn = nn.CrossEntropyLoss()
    order = rng.permutation(len(images))
    total = 0.0
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        if len(index) < min_batch_size:
            continue
        x = gf.tensor(images[index], device=device)
        y = gf.tensor(labels[index], device=device)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(index)
    return total / len(images)


# -- character-level language models -----------------------------------------


class CharVocabulary:
    """The characters of a text, each mapped to an integer id."""

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        unknown = sorted(set(text) - set(self.ids))
        if unknown:
            raise ValueError(
                f"characters {unknown} do not occur in the training text; "
                "use a prompt made of characters that do."
            )
        return np.array([self.ids[c] for c in text], dtype=np.int64)

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)


def add_generation_arguments(parser, sample_length):
    """Add --log-every, --prompt, --sample-length, --temperature and --device."""
    parser.add_argument("--log-every", type=int, default=50,
                        help="print the mean loss every this many steps")
    parser.add_argument("--prompt", default="PROSPERO.\n",
                        help="text that the sample continues")
    parser.add_argument("--sample-length", type=int, default=sample_length,
                        help="characters to generate after training")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature (lower is more conservative)")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "auto"')


def next_char_loss(logits, targets, device):
    """Return the mean cross-entropy of (N, L, vocab) logits against (N, L) ids."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           gf.tensor(targets.reshape(-1), device=device))


def print_progress(step, losses, args, started):
    """Print the mean loss of the last ``args.log_every`` steps when one is due.

    A report is due every ``args.log_every`` steps and at step ``args.steps``.
    ``started`` is the ``time.perf_counter()`` value at the start of training.
    """
    if step % args.log_every == 0 or step == args.steps:
        recent = np.mean(losses[-args.log_every:])
        elapsed = time.perf_counter() - started
        print(f"step {step:5d}  loss {recent:.3f}  ({elapsed:.1f} s)")


def draw_next_id(logits, temperature, rng):
    """Draw an id from softmax(logits / temperature) for a NumPy or CuPy vector."""
    logits = np.asarray(logits.get() if hasattr(logits, "get") else logits)
    logits = logits.astype(np.float64) / temperature
    probs = np.exp(logits - logits.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))
