"""Checkpointing a chain of layers in equal segments."""

from ._region import checkpoint

__all__ = ["checkpoint_sequential"]


def checkpoint_sequential(functions, segments, input, preserve_rng_state=True,
                          policy=None):
    """Run ``functions`` in order, checkpointing them in ``segments`` equal parts.

    ``functions`` is a ``gf.nn.Sequential`` or a list of callables taking and
    returning one Tensor. Every segment but the last is checkpointed, which
    keeps only the segment's input for backward. The last segment runs
    normally, because backward starts there and would recompute it at once.
    With ``segments == 1`` nothing is checkpointed. Segments differ in length
    by at most one layer, the longer ones first.

    With a ``policy`` the whole chain, the last segment included, runs as one
    selective region (see ``gf.checkpoint``). That region recomputes op by op
    and never reruns a segment, so ``segments`` is checked but changes nothing.

    >>> y = gf.checkpoint_sequential(model, 8, x)   # 64 layers, 8 per segment
    """
    layers = _as_layers(functions)
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise ValueError(
            f"checkpoint_sequential: segments must be a positive int, got "
            f"{segments!r}."
        )
    if segments > len(layers):
        raise ValueError(
            f"checkpoint_sequential: {segments} segments were requested for "
            f"{len(layers)} layers; pass at most {len(layers)}."
        )
    if policy is not None:
        return checkpoint(chain(layers), input, policy=policy)
    bounds = segment_bounds(len(layers), segments)
    out = input
    for index, (start, stop) in enumerate(bounds):
        run = chain(layers[start:stop])
        if index == len(bounds) - 1:
            out = run(out)
        else:
            out = checkpoint(run, out, preserve_rng_state=preserve_rng_state)
    return out


def segment_bounds(count, segments):
    """Return ``segments`` (start, stop) pairs covering ``range(count)``."""
    base, extra = divmod(count, segments)
    bounds = []
    start = 0
    for index in range(segments):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def list_layers(model):
    """Return the children of a Module, or the items of any other iterable."""
    if hasattr(model, "children") and callable(model.children):
        return list(model.children())
    return list(model)


def _as_layers(functions):
    layers = list_layers(functions)
    for i, layer in enumerate(layers):
        if not callable(layer):
            raise TypeError(
                f"checkpoint_sequential: item {i} is a {type(layer).__name__}, "
                "not a callable layer."
            )
    if not layers:
        raise ValueError("checkpoint_sequential: functions contains no layer.")
    return layers


def chain(layers):
    """Return a function that applies ``layers`` in order."""

    def run(x):
        for layer in layers:
            x = layer(x)
        return x

    return run
