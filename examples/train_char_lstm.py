"""Train a character-level LSTM language model with truncated BPTT, then sample.

The text (examples/data/tempest.txt, see examples/data/README.md) is cut
into ``--batch-size`` parallel streams. Each step reads the next
``--seq-len`` characters of every stream, carries the LSTM state over from
the previous step *detached* (truncated backpropagation through time), and
predicts each next character. The loss is printed as it falls, and the
model then writes a sample continuing a prompt.

    python examples/train_char_lstm.py                  # about a minute on a CPU
    python examples/train_char_lstm.py --steps 50 --device cuda
"""

import argparse
import pathlib
import time

import numpy as np

import gradflow as gf

from _common import (
    TEMPEST, CharVocabulary, add_generation_arguments, draw_next_id, next_char_loss,
    print_progress,
)


class CharLSTM(gf.nn.Module):
    """Embedding, a stacked LSTM and a linear read-out to next-character logits."""

    def __init__(self, vocab_size, embed_size, hidden_size, num_layers, dropout,
                 device):
        super().__init__()
        self.embed = gf.nn.Embedding(vocab_size, embed_size, device=device)
        self.lstm = gf.nn.LSTM(embed_size, hidden_size, num_layers=num_layers,
                               batch_first=True, dropout=dropout, device=device)
        self.head = gf.nn.Linear(hidden_size, vocab_size, device=device)

    def forward(self, ids, state=None):
        """Return (N, L, vocab) logits and the LSTM's final (h, c) for ids (N, L)."""
        out, state = self.lstm(self.embed(ids), state)
        return self.head(out), state


def stream_batches(ids, batch_size, seq_len):
    """Yield (inputs, targets, restart) windows of shape (batch_size, seq_len).

    The ids are laid out as ``batch_size`` contiguous streams, so window k+1
    of a row continues window k of that row and the carried state stays
    meaningful. ``restart`` is True when the walk wraps around to the start.
    """
    width = (len(ids) - 1) // batch_size
    streams = ids[: width * batch_size + 1]
    inputs = streams[:-1].reshape(batch_size, width)
    targets = streams[1:].reshape(batch_size, width)
    while True:
        for start in range(0, width - seq_len + 1, seq_len):
            window = slice(start, start + seq_len)
            yield inputs[:, window], targets[:, window], start == 0


def clip_gradients(parameters, max_norm):
    """Scale all gradients down together so their global L2 norm is <= max_norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = sum(float((g.data * g.data).sum()) for g in grads) ** 0.5
    if total > max_norm:
        for g in grads:
            g.data *= max_norm / total
    return total


def train(model, batches, args, device):
    """Run ``args.steps`` optimizer steps and return the loss of every step."""
    optimizer = gf.optim.Adam(model.parameters(), lr=args.lr)
    state = None
    losses = []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets, restart = next(batches)
        if restart:
            state = None
        logits, state = model(gf.tensor(inputs, device=device), state)
        # Truncated BPTT: the next window starts from this state's values,
        # but its backward stops here instead of reaching into freed graphs.
        state = tuple(s.detach() for s in state)
        loss = next_char_loss(logits, targets, device)
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(model.parameters(), args.clip)
        optimizer.step()
        losses.append(loss.item())
        print_progress(step, losses, args, started)
    return losses


def sample(model, vocab, prompt, length, temperature, device, seed):
    """Return ``prompt`` continued by ``length`` characters drawn from the model."""
    rng = np.random.default_rng(seed)
    model.eval()
    ids = list(vocab.encode(prompt))
    with gf.no_grad():
        logits, state = model(gf.tensor(np.array([ids]), device=device))
        for _ in range(length):
            next_id = draw_next_id(logits.data[0, -1], temperature, rng)
            ids.append(next_id)
            step_input = gf.tensor(np.array([[next_id]]), device=device)
            logits, state = model(step_input, state)
    model.train()
    return vocab.decode(ids)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=pathlib.Path, default=TEMPEST,
                        help="plain-text file to train on")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="parallel text streams per step")
    parser.add_argument("--seq-len", type=int, default=64,
                        help="time steps per window, i.e. the truncation length K")
    parser.add_argument("--embed-size", type=int, default=32,
                        help="features of each character embedding")
    parser.add_argument("--hidden-size", type=int, default=128,
                        help="LSTM hidden features")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked LSTM layers")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout between LSTM layers (needs --num-layers > 1)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--clip", type=float, default=1.0,
                        help="maximum global gradient norm")
    add_generation_arguments(parser, sample_length=300)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights and of the sampling")
    return parser.parse_args(argv)


def main(argv=None):
    """Train and sample, returning the per-step losses, the sample and the time."""
    args = parse_args(argv)
    gf.manual_seed(args.seed)
    device = gf.device(args.device)
    text = args.text.read_text(encoding="utf-8")
    vocab = CharVocabulary(text)
    print(f"{len(text)} characters, {len(vocab)} distinct, device {device}")
    model = CharLSTM(len(vocab), args.embed_size, args.hidden_size,
                     args.num_layers, args.dropout, device)
    batches = stream_batches(vocab.encode(text), args.batch_size, args.seq_len)
    started = time.perf_counter()
    losses = train(model, batches, args, device)
    seconds = time.perf_counter() - started
    text_out = sample(model, vocab, args.prompt, args.sample_length,
                      args.temperature, device, args.seed)
    print(f"--- sample after {args.steps} steps ---\n{text_out}")
    return {"losses": losses, "sample": text_out, "train_seconds": seconds}


if __name__ == "__main__":
    main()
