"""Hooks on the values that ops save for backward.

``saved_tensors_hooks(pack_hook, unpack_hook)`` follows PyTorch's context
manager of the same name (``torch.autograd.graph.saved_tensors_hooks``).
Inside the block, every value an op records for backward goes through
``pack_hook`` when the record is made, and the record keeps what the hook
returns. ``unpack_hook`` turns that back into a Tensor each time backward
reads it. Offloading to the host, compressing and recomputing activations
are built this way; ``gf.checkpoint.Policy`` is one user.
"""

from . import _function

__all__ = ["saved_tensors_hooks"]


class saved_tensors_hooks:
    """Pack the values that ops save for backward, and unpack them on use.

    ``pack_hook(tensor)`` runs once per saved Tensor when an op inside the
    block is recorded and may return any object. ``unpack_hook(packed)``
    receives that object each time backward reads the value and must return
    a Tensor of the same shape, dtype and content. Saved ``None`` values are
    not passed to the hooks.

    Differences from PyTorch worth knowing:

    * An op's own output reaches ``pack_hook`` as a Tensor that shares the
      output's array but has no ``grad_fn``, so a hook that returns its
      argument does not make the record hold itself.
    * The Tensor that ``unpack_hook`` returns lends only its content. The
      record gives it back its place in the graph, so its own ``grad_fn``
      does not matter. A leaf input comes back as the leaf itself when the
      content is the leaf's own array, and otherwise as a new Tensor that
      passes its gradient to the leaf, as in PyTorch.
    * A saved input changed in place after the record still raises
      ``InplaceModificationError`` in backward, also when ``pack_hook``
      copied it, whereas PyTorch (2.x) skips that check for hooked values.
    * Both hooks run with gradient recording off.

    Only the innermost active block applies. The hooks stay with the records
    made inside the block, also when backward runs after it ends.

    NOTE: the list of active hooks is global, not per thread, so a block
    opened in one thread also packs the records that other threads make
    meanwhile.

    >>> stored = []
    >>> def pack(t):
    ...     stored.append(t.shape)
    ...     return t.detach().numpy().copy()
    >>> with gf.autograd.graph.saved_tensors_hooks(pack, gf.tensor):
    ...     y = (x * x).sum()
    >>> y.backward()
    """

    def __init__(self, pack_hook, unpack_hook):
        for name, hook in (("pack_hook", pack_hook), ("unpack_hook", unpack_hook)):
            if not callable(hook):
                raise TypeError(
                    f"saved_tensors_hooks: {name} must be callable, got "
                    f"{type(hook).__name__}."
                )
        self.pack_hook = pack_hook
        self.unpack_hook = unpack_hook

    def __enter__(self):
        _function.saved_tensors_hooks.append((self.pack_hook, self.unpack_hook))
        return self

    def __exit__(self, *exc_info):
        hooks = _function.saved_tensors_hooks
        # Remove this pair even when blocks were left out of order.
        for index in range(len(hooks) - 1, -1, -1):
            pack_hook, unpack_hook = hooks[index]
            if pack_hook is self.pack_hook and unpack_hook is self.unpack_hook:
                del hooks[index]
                break
        return False
