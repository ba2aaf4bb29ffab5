"""gf.save and gf.load: checkpoints in the safetensors format.

A file stores every Tensor of the saved object as a safetensors tensor and
the rest of the object (dicts, lists, tuples, numbers, strings, None) as
JSON in the safetensors metadata, under ``gradflow.structure``. The
structure is a tree of one-key nodes: ``{"dict": [[key, node], ...]}``,
``{"list": [...]}``, ``{"tuple": [...]}``, ``{"tensor": name}`` and
``{"value": v}``. A SHA-256 digest of the tensors (``gradflow.sha256``)
lets ``load`` detect corrupted tensor bytes.

Tensor names: a flat dict of Tensors keeps its keys as the names, so
other safetensors readers see the usual state_dict keys. In any other
object a tensor is named by its path of keys and list indices, joined by
"." with "." and "\\" inside a key escaped by a backslash.

Loading parses only JSON and the safetensors layout, so it never runs
code from the file.
"""

import hashlib
import json
import os
import secrets

import numpy as np
import safetensors
import safetensors.numpy

from . import _device
from ._tensor import Tensor, make_tensor, tensor

__all__ = ["save", "load"]

_FORMAT_KEY = "gradflow.format"
_FORMAT_VERSION = "1"
_STRUCTURE_KEY = "gradflow.structure"
_DIGEST_KEY = "gradflow.sha256"
_RESERVED_NAME = "__metadata__"
# safetensors rejects headers above 100 MB, so a larger length prefix marks
# a file of another format.
_MAX_HEADER_BYTES = 100_000_000
_SUPPORTED_KINDS = "biuf"
# The safetensors dtypes that NumPy can represent, so gf.load can read them.
_NUMPY_DTYPES = {
    "BOOL", "U8", "I8", "U16", "I16", "F16", "U32", "I32", "F32", "U64", "I64",
    "F64", "C64",
}
# Common names of the safetensors dtypes that NumPy lacks, for error messages.
_DTYPE_NAMES = {
    "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
# The deepest nesting of dicts, lists and tuples that save writes and load
# reads. Checkpoints need a handful of levels; the bound keeps a crafted
# structure from exhausting Python's recursion limit (1000 frames by default).
_MAX_DEPTH = 100


def save(obj, path):
    """Write ``obj`` to ``path`` in the safetensors format, atomically.

    ``obj`` is a Tensor, a flat ``state_dict`` of Tensors, or a nested
    structure of dicts (str or int keys), lists and tuples whose leaves are
    Tensors, ints, floats, bools, strings or None. NumPy scalars are stored
    as Python numbers. Tensors are stored by value, without autograd
    state, and two entries that share memory are stored twice.

    The file is written to a temporary file in the same directory, flushed
    to disk and renamed over ``path``, so a failure leaves an existing
    ``path`` unchanged. A missing directory raises FileNotFoundError, and
    nesting deeper than 100 levels raises ValueError.

    >>> gf.save({"model": model.state_dict(), "epoch": 3}, "ckpt.safetensors")
    """
    flat = _is_flat_state_dict(obj)
    arrays = {}
    structure = _encode(obj, (), arrays, flat)
    metadata = {
        _FORMAT_KEY: _FORMAT_VERSION,
        _STRUCTURE_KEY: json.dumps(structure, separators=(",", ":")),
        _DIGEST_KEY: _digest(arrays),
    }
    _write_atomic(os.fspath(path), arrays, metadata)


def load(path, device=None):
    """Read an object written by ``gf.save`` (or any safetensors file).

    Tensors are created on the CPU, or on ``device`` when given, as leaves
    that do not require grad. A safetensors file written by another
    program loads as a flat dict of Tensors.

    NOTE: only files written by ``gf.save`` carry a digest, so changed
    tensor bytes in another writer's file go undetected.

    Raises ValueError when ``path`` is not a safetensors file (a pickle,
    for example), is truncated or corrupted, stores a dtype that NumPy
    lacks (bfloat16, float8), or has a gradflow structure nested more than
    100 levels deep or no digest. Nothing is returned then.

    >>> checkpoint = gf.load("ckpt.safetensors")
    >>> model.load_state_dict(checkpoint["model"])
    """
    path = os.fspath(path)
    _check_header(path)
    metadata, arrays = _read_file(path)
    target = None if device is None else _device.device(device)
    tensors = {name: _to_tensor(array, target) for name, array in arrays.items()}
    if _FORMAT_KEY not in metadata:
        return tensors
    if metadata[_FORMAT_KEY] != _FORMAT_VERSION:
        raise ValueError(
            f"gf.load: {path} uses gradflow checkpoint format "
            f"{metadata[_FORMAT_KEY]!r}, but this gradflow reads format "
            f"{_FORMAT_VERSION!r}. Upgrade gradflow to read it."
        )
    if _DIGEST_KEY not in metadata:
        raise ValueError(
            f"gf.load: {path} is damaged: its metadata has no SHA-256 digest "
            f"({_DIGEST_KEY}), which gf.save always writes, so the tensor data "
            "cannot be verified. Save the checkpoint again from its source."
        )
    if metadata[_DIGEST_KEY] != _digest(arrays):
        raise ValueError(
            f"gf.load: {path} is corrupted: its tensor data does not match "
            "the SHA-256 digest stored when it was written."
        )
    return _decode_file_structure(path, metadata, tensors)


# -- encoding -------------------------------------------------------------------

def _is_flat_state_dict(obj):
    return isinstance(obj, dict) and all(
        isinstance(key, str) and isinstance(value, Tensor)
        for key, value in obj.items()
    )


def _encode(value, keys, arrays, flat):
    if len(keys) > _MAX_DEPTH:
        raise ValueError(
            f"gf.save: obj is nested more than {_MAX_DEPTH} levels deep (at "
            f"{_describe(keys[:3])}...), more than gf.load reads. Flatten the "
            "structure."
        )
    if isinstance(value, Tensor):
        name = keys[-1] if flat else _tensor_name(keys)
        name = _unique_name(name, arrays)
        arrays[name] = _host_array(value, keys)
        return {"tensor": name}
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            _check_key(key, keys)
            items.append([key, _encode(item, keys + (key,), arrays, flat)])
        return {"dict": items}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [
            _encode(item, keys + (i,), arrays, flat) for i, item in enumerate(value)
        ]}
    return {"value": _plain_value(value, keys)}


def _plain_value(value, keys):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    raise TypeError(
        f"gf.save: cannot store a {type(value).__name__} at {_describe(keys)}. "
        "It stores Tensors, dicts, lists, tuples, and int, float, bool, str "
        "or None values. Convert the value to one of these first."
    )


def _check_key(key, keys):
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(
            f"gf.save: dict keys must be str or int, got {key!r} "
            f"({type(key).__name__}) in {_describe(keys)}."
        )


def _tensor_name(keys):
    parts = [str(k).replace("\\", "\\\\").replace(".", "\\.") for k in keys]
    return ".".join(parts) if parts else "tensor"


def _unique_name(name, arrays):
    # Names of different paths collide only when a dict contains both the
    # int key 0 and the str key "0", or a key is safetensors' reserved name.
    candidate, count = name, 1
    while candidate in arrays or candidate == _RESERVED_NAME:
        candidate = f"{name}#{count}"
        count += 1
    return candidate


def _host_array(t, keys):
    array = t.data if isinstance(t.data, np.ndarray) else t.data.get()
    if array.dtype.kind not in _SUPPORTED_KINDS:
        raise TypeError(
            f"gf.save: the tensor at {_describe(keys)} has dtype {array.dtype}, "
            "which safetensors cannot store. Use a bool, int, uint or float "
            "dtype."
        )
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    # np.ascontiguousarray would turn a 0-d array into shape (1,).
    return array if array.flags.c_contiguous else array.copy(order="C")


def _describe(keys):
    return "obj" + "".join(f"[{key!r}]" for key in keys)


def _digest(arrays):
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        header = f"{name}\0{array.dtype.str}\0{array.shape}\0"
        digest.update(header.encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _write_atomic(path, arrays, metadata):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"gf.save: cannot write {path}: the directory {directory} does not "
            "exist or is not a directory. Create it first, e.g. with "
            "os.makedirs."
        )
    temporary = os.path.join(
        directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp"
    )
    # O_EXCL makes the name ours alone, and mode 0o666 lets the umask decide
    # the final permissions, as for any new file.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        _write_tensors(arrays, temporary, metadata)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise
    _fsync_directory(directory)


def _write_tensors(arrays, path, metadata):
    safetensors.numpy.save_file(arrays, path, metadata=metadata)


def _remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(directory):
    # Makes the rename durable. Windows cannot open directories, so it skips this.
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- decoding -------------------------------------------------------------------

def _check_header(path):
    """Raise ValueError unless ``path`` starts like a safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        start = f.read(min(length, 2, _MAX_HEADER_BYTES))
    if length == 0 or length > _MAX_HEADER_BYTES or start[:1] != b"{":
        raise ValueError(
            f"gf.load: {path} is not a gradflow/safetensors file (its first "
            "bytes are not a safetensors header). gf.load reads only files "
            "written by gf.save or other safetensors writers. It never "
            "unpickles, so convert a pickled checkpoint with the program "
            "that wrote it."
        )
    if length > size - 8:
        raise ValueError(
            f"gf.load: {path} is truncated: its header declares {length} "
            f"bytes but the file has {size} bytes."
        )


def _read_file(path):
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            unsupported = _first_unsupported_dtype(f)
            if unsupported is None:
                arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise ValueError(
            f"gf.load: {path} is truncated or corrupted and cannot be read: {exc}"
        ) from None
    if unsupported is not None:
        _raise_unsupported_dtype(path, *unsupported)
    return metadata, arrays


def _first_unsupported_dtype(f):
    """Return (name, safetensors dtype) of the first tensor NumPy lacks, or None."""
    for name in f.keys():
        dtype = f.get_slice(name).get_dtype()
        if dtype not in _NUMPY_DTYPES:
            return name, dtype
    return None


def _raise_unsupported_dtype(path, name, dtype):
    label = _DTYPE_NAMES.get(dtype, dtype)
    raise ValueError(
        f"gf.load: {path} stores tensor {name!r} as {label} (safetensors "
        f"dtype {dtype}), which gradflow does not support because NumPy has "
        "no such dtype. Convert the tensors to float32 or float16 with the "
        "program that wrote the file (in PyTorch: "
        "{k: v.float() for k, v in state_dict.items()}) and save them again."
    )


def _to_tensor(array, target):
    if target is None or target.type == "cpu":
        return make_tensor(array)
    return tensor(array, device=target)


def _decode_file_structure(path, metadata, tensors):
    used = set()
    try:
        structure = _parse_structure(metadata[_STRUCTURE_KEY])
        obj = _decode(structure, tensors, used, 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"gf.load: {path} is corrupted: its gradflow.structure metadata "
            f"is invalid ({type(exc).__name__}: {exc})."
        ) from None
    if used != set(tensors):
        raise ValueError(
            f"gf.load: {path} is corrupted: its structure does not account for "
            f"the tensors {sorted(set(tensors) - used)}."
        )
    return obj


def _parse_structure(text):
    try:
        return json.loads(text)
    except RecursionError:
        # json's parser recurses once per bracket, so a deep enough text
        # exhausts the stack before _decode can check the depth.
        raise ValueError(
            f"it is nested more than {_MAX_DEPTH} levels deep"
        ) from None


def _decode(node, tensors, used, depth):
    if depth > _MAX_DEPTH:
        raise ValueError(f"it is nested more than {_MAX_DEPTH} levels deep")
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"expected a one-key node, got {node!r}")
    (kind, body), = node.items()
    if kind == "tensor":
        used.add(body)
        return tensors[body]
    if kind == "value":
        return body
    if kind == "dict":
        return {key: _decode(item, tensors, used, depth + 1) for key, item in body}
    if kind in ("list", "tuple"):
        items = [_decode(item, tensors, used, depth + 1) for item in body]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown node kind {kind!r}")
