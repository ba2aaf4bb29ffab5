"""Readers for dataset files: the IDX format of MNIST and its relatives.

An IDX file starts with a 4-byte magic number: two zero bytes, a dtype
code and the number of dimensions. Each dimension follows as a
big-endian uint32, then the values in C order, big-endian. Files ending
in ``.gz`` are decompressed on the fly.

>>> images, labels = gf.data.load_mnist("~/datasets/mnist", split="test")
>>> x = gf.tensor(images, device="auto")
"""

import gzip
import os
import zlib

import numpy as np

__all__ = ["read_idx", "load_mnist"]

# The third byte of the magic number: the dtype of the values.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path):
    """Read an IDX file (or ``.gz``-compressed one) into a NumPy array.

    Returns an array with the file's shape and dtype (uint8, int8, int16,
    int32, float32 or float64) in native byte order. Raises ValueError for
    a wrong magic number, an unknown dtype code, or a payload shorter or
    longer than the dimensions declare.

    >>> labels = read_idx("train-labels-idx1-ubyte.gz")   # shape (60000,)
    """
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"read_idx: {path} is not an IDX file: it must start with two zero "
            f"bytes, but starts with {raw[:4].hex() or 'nothing'}."
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(
            f"read_idx: {path} has unknown dtype code 0x{code:02X} (known: {known})."
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"read_idx: {path} is truncated: it declares {ndim} dimensions but "
            f"ends inside their sizes ({len(raw)} bytes)."
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header_size
    if payload != expected:
        problem = "truncated" if payload < expected else "longer than declared"
        raise ValueError(
            f"read_idx: {path} is {problem}: shape {shape} of {dtype.name} "
            f"needs {expected} bytes of data, the file has {payload}."
        )
    array = np.frombuffer(raw, dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _read_bytes(path):
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(
            f"read_idx: {path} is not a valid gzip file or is truncated: {exc}"
        ) from None


def load_mnist(directory, split="train", flatten=True):
    """Load the MNIST images and labels of ``split`` from ``directory``.

    ``directory`` contains the standard file names, such as
    ``train-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain
    or with ``.gz``, and ``split`` is ``"train"`` or ``"test"``. Nothing is
    downloaded.

    Returns ``(images, labels)`` as NumPy arrays: images float32 in [0, 1]
    of shape (N, H*W), or (N, H, W) with ``flatten=False``, and labels
    int64 of shape (N,).
    """
    if split not in _MNIST_FILES:
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}.")
    directory = os.path.expanduser(os.fspath(directory))
    image_name, label_name = _MNIST_FILES[split]
    images = read_idx(_find_file(directory, image_name))
    labels = read_idx(_find_file(directory, label_name))
    _check_mnist_arrays(directory, split, images, labels)
    images = images.astype(np.float32) / np.float32(255)
    if flatten:
        images = images.reshape(len(images), -1)
    return images, labels.astype(np.int64)


def _find_file(directory, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"load_mnist: neither {name} nor {name}.gz was found in {directory}. "
        "Download the MNIST IDX files into that directory first."
    )


def _check_mnist_arrays(directory, split, images, labels):
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"load_mnist: the {split} images in {directory} have shape "
            f"{images.shape} and dtype {images.dtype}, expected uint8 of "
            "shape (N, H, W)."
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"load_mnist: the {split} labels in {directory} have shape "
            f"{labels.shape} but there are {len(images)} images, expected "
            f"shape ({len(images)},)."
        )
