"""Train a small causal Transformer on characters of a text, then sample.

A decoder-only model: token and learned position embeddings, a stack of
pre-norm ``gf.nn.TransformerEncoderLayer`` blocks run with a causal mask
(each position attends only to itself and earlier ones), a final LayerNorm
and a linear read-out. Each step trains on random windows of
``--block-size`` characters of examples/data/tempest.txt (see
examples/data/README.md).

    python examples/tiny_transformer.py                 # about two minutes on a CPU
    python examples/tiny_transformer.py --steps 100 --device cuda
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


class TinyTransformer(gf.nn.Module):
    """A character-level causal Transformer language model."""

    def __init__(self, vocab_size, block_size, d_model, nhead, num_layers, dropout,
                 device):
        super().__init__()
        self.block_size = block_size
        self.token_embed = gf.nn.Embedding(vocab_size, d_model, device=device)
        self.position_embed = gf.nn.Embedding(block_size, d_model, device=device)
        layer = gf.nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=4 * d_model, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True, device=device,
        )
        self.blocks = gf.nn.TransformerEncoder(layer, num_layers)
        self.norm = gf.nn.LayerNorm(d_model, device=device)
        self.head = gf.nn.Linear(d_model, vocab_size, device=device)

    def forward(self, ids):
        """Return (N, L, vocab) next-character logits for ids of shape (N, L)."""
        length = ids.shape[1]
        if length > self.block_size:
            raise ValueError(
                f"TinyTransformer: sequences of length {length} exceed "
                f"block_size={self.block_size}; crop them to the last "
                f"{self.block_size} characters."
            )
        positions = gf.arange(length, device=ids.device)
        x = self.token_embed(ids) + self.position_embed(positions)
        x = self.blocks(x, is_causal=True)
        return self.head(self.norm(x))


def random_windows(ids, batch_size, block_size, rng):
    """Return (inputs, targets) of shape (batch_size, block_size) at random offsets."""
    starts = rng.integers(0, len(ids) - block_size - 1, size=batch_size)
    inputs = np.stack([ids[s:s + block_size] for s in starts])
    targets = np.stack([ids[s + 1:s + block_size + 1] for s in starts])
    return inputs, targets


def train(model, ids, args, device):
    """Run ``args.steps`` AdamW steps and return the loss of every step."""
    optimizer = gf.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    losses = []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets = random_windows(ids, args.batch_size, args.block_size, rng)
        logits = model(gf.tensor(inputs, device=device))
        loss = next_char_loss(logits, targets, device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print_progress(step, losses, args, started)
    return losses


def sample(model, vocab, prompt, length, temperature, device, seed):
    """Return ``prompt`` continued by ``length`` characters drawn from the model."""
    rng = np.random.default_rng(seed)
    ids = list(vocab.encode(prompt))
    model.eval()
    with gf.no_grad():
        for _ in range(length):
            context = np.array([ids[-model.block_size:]])
            logits = model(gf.tensor(context, device=device)).data[0, -1]
            ids.append(draw_next_id(logits, temperature, rng))
    model.train()
    return vocab.decode(ids)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=pathlib.Path, default=TEMPEST,
                        help="plain-text file to train on")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="windows per step")
    parser.add_argument("--block-size", type=int, default=64,
                        help="context length in characters")
    parser.add_argument("--d-model", type=int, default=64,
                        help="features per position")
    parser.add_argument("--nhead", type=int, default=4, help="attention heads")
    parser.add_argument("--num-layers", type=int, default=2,
                        help="Transformer blocks")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout probability inside the blocks")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    add_generation_arguments(parser, sample_length=200)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the windows and the sampling")
    return parser.parse_args(argv)


def main(argv=None):
    """Train and sample, returning the per-step losses, the sample and the time."""
    args = parse_args(argv)
    gf.manual_seed(args.seed)
    device = gf.device(args.device)
    text = args.text.read_text(encoding="utf-8")
    vocab = CharVocabulary(text)
    ids = vocab.encode(text)
    print(f"{len(text)} characters, {len(vocab)} distinct, device {device}")
    model = TinyTransformer(len(vocab), args.block_size, args.d_model, args.nhead,
                            args.num_layers, args.dropout, device)
    started = time.perf_counter()
    losses = train(model, ids, args, device)
    seconds = time.perf_counter() - started
    text_out = sample(model, vocab, args.prompt, args.sample_length,
                      args.temperature, device, args.seed)
    print(f"--- sample after {args.steps} steps ---\n{text_out}")
    return {"losses": losses, "sample": text_out, "train_seconds": seconds}


if __name__ == "__main__":
    main()
