"""Tests of gradflow.data: the IDX reader and the MNIST loader, on files they write."""

import gzip

import numpy as np
import pytest

import gradflow as gf
from gradflow.data import load_mnist, read_idx

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
         np.float32: 0x0D, np.float64: 0x0E}


def _idx_bytes(array, code=None):
    array = np.asarray(array)
    code = CODES[array.dtype.type] if code is None else code
    header = bytes([0, 0, code, array.ndim])
    dims = np.array(array.shape, dtype=">u4").tobytes()
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, content, compress=False):
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(content)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("dtype", list(CODES), ids=lambda d: np.dtype(d).name)
def test_reads_each_dtype(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    result = read_idx(_write(tmp_path / "a-idx3", _idx_bytes(array)))
    assert result.dtype == np.dtype(dtype)
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_reads_big_endian_values(tmp_path):
    header = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2])
    content = header + bytes([0, 0, 1, 2, 255, 255, 255, 254])
    result = read_idx(_write(tmp_path / "a", content))
    assert result.tolist() == [258, -2]


def test_reads_gzip(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    path = _write(tmp_path / "a-idx1-ubyte.gz", _idx_bytes(array), compress=True)
    np.testing.assert_array_equal(read_idx(path), array)


def test_reads_zero_dimensions(tmp_path):
    result = read_idx(_write(tmp_path / "a", _idx_bytes(np.array(7, dtype=np.int16))))
    assert result.shape == ()
    assert result.item() == 7


def test_reads_empty_axis(tmp_path):
    result = read_idx(_write(tmp_path / "a", _idx_bytes(np.zeros((0, 28), np.uint8))))
    assert result.shape == (0, 28)


def test_rejects_wrong_magic(tmp_path):
    path = _write(tmp_path / "a", b"\x1f\x8b\x08\x03" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_rejects_empty_file(tmp_path):
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(_write(tmp_path / "a", b""))


def test_rejects_unknown_dtype(tmp_path):
    path = _write(tmp_path / "a", bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(ValueError, match="unknown dtype code 0x0A"):
        read_idx(path)


def test_rejects_truncated_payload(tmp_path):
    content = _idx_bytes(np.arange(12, dtype=np.int32).reshape(3, 4))
    message = "truncated.*48 bytes of data, the file has 47"
    with pytest.raises(ValueError, match=message):
        read_idx(_write(tmp_path / "a", content[:-1]))


def test_rejects_truncated_dims(tmp_path):
    content = _idx_bytes(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="ends inside their sizes"):
        read_idx(_write(tmp_path / "a", content[:9]))


def test_rejects_trailing_bytes(tmp_path):
    content = _idx_bytes(np.zeros(4, np.uint8)) + b"\x00"
    with pytest.raises(ValueError, match="longer than declared"):
        read_idx(_write(tmp_path / "a", content))


def test_rejects_truncated_gzip(tmp_path):
    path = _write(tmp_path / "a.gz", _idx_bytes(np.arange(200, dtype=np.uint8)),
                  compress=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


def test_rejects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")


# -- load_mnist -----------------------------------------------------------------

def _write_mnist(directory, split, count, compress=False, size=(4, 5)):
    prefix = "train" if split == "train" else "t10k"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, *size), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        path = directory / f"{prefix}-{kind}-ubyte{suffix}"
        _write(path, _idx_bytes(array), compress)
    return images, labels


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_split_files(tmp_path, split):
    images, labels = _write_mnist(tmp_path, split, 6)
    x, y = load_mnist(tmp_path, split=split)
    assert x.shape == (6, 20)
    assert x.dtype == np.float32
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x, images.reshape(6, -1) / 255.0, rtol=1e-6)


def test_mnist_scaled_to_unit_interval(tmp_path):
    _write_mnist(tmp_path, "train", 5)
    x, _ = load_mnist(tmp_path)
    assert x.min() == 0.0
    assert x.max() == 1.0


def test_mnist_unflattened(tmp_path):
    _write_mnist(tmp_path, "test", 3, compress=True)
    x, _ = load_mnist(str(tmp_path), split="test", flatten=False)
    assert x.shape == (3, 4, 5)


def test_mnist_wraps_as_tensor(tmp_path):
    _write_mnist(tmp_path, "train", 3)
    x, y = load_mnist(tmp_path)
    assert gf.tensor(x).shape == (3, 20)
    assert gf.tensor(y).dtype == gf.int64


def test_mnist_missing_file(tmp_path):
    _write_mnist(tmp_path, "train", 3)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, split="test")


def test_mnist_rejects_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, split="validation")


def test_mnist_rejects_count_mismatch(tmp_path):
    _write_mnist(tmp_path, "train", 4)
    labels = np.zeros(3, dtype=np.uint8)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels))
    with pytest.raises(ValueError, match="4 images"):
        load_mnist(tmp_path)


def test_mnist_rejects_image_rank(tmp_path):
    _write_mnist(tmp_path, "train", 4)
    flat_images = np.zeros((4, 20), np.uint8)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(flat_images))
    with pytest.raises(ValueError, match=r"expected uint8 of shape \(N, H, W\)"):
        load_mnist(tmp_path)
