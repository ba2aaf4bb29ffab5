"""Tests of gf.save and gf.load: round trips, atomic writes, rejected files."""

import os
import pickle

import numpy as np
import pytest

import gradflow as gf
from gradflow import _serialization
from conftest import to_host

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
          np.int64, np.uint8, np.bool_]


def _array(dtype, shape=(3, 4)):
    rng = np.random.default_rng(7)
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if np.dtype(dtype).kind == "f":
        values = rng.standard_normal(shape) * 100
        values.flat[:3] = [np.inf, -0.0, np.finfo(dtype).tiny]
        return values.astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _same_tensor(got, want):
    assert isinstance(got, gf.Tensor)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(to_host(got), to_host(want))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dtype_round_trip(tmp_path, dtype):
    t = gf.tensor(_array(dtype))
    gf.save({"t": t}, tmp_path / "a.safetensors")
    _same_tensor(gf.load(tmp_path / "a.safetensors")["t"], t)


def test_nan_round_trips_bitwise(tmp_path):
    values = np.array([np.nan, -np.nan, 1.0], dtype=np.float32)
    gf.save({"t": gf.tensor(values)}, tmp_path / "a.safetensors")
    loaded = to_host(gf.load(tmp_path / "a.safetensors")["t"])
    assert loaded.tobytes() == values.tobytes()


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1, 1, 1, 5)])
def test_shape_round_trip(tmp_path, shape):
    t = gf.tensor(np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape))
    gf.save({"t": t}, tmp_path / "a.safetensors")
    _same_tensor(gf.load(tmp_path / "a.safetensors")["t"], t)


def test_non_contiguous_tensor(tmp_path):
    t = gf.tensor(np.arange(12.0).reshape(3, 4)).T
    gf.save({"t": t}, tmp_path / "a.safetensors")
    _same_tensor(gf.load(tmp_path / "a.safetensors")["t"], t)


def test_single_tensor(tmp_path):
    t = gf.randn(2, 3)
    gf.save(t, tmp_path / "a.safetensors")
    _same_tensor(gf.load(tmp_path / "a.safetensors"), t)


def _checkpoint():
    return {
        "model": {"0.weight": gf.randn(4, 3), "0.bias": gf.zeros(4)},
        "optimizer": {
            "state": {0: {"step": 3, "exp_avg": gf.ones(4, 3)}, 1: {"step": 3}},
            "param_groups": [
                {"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1],
                 "amsgrad": False, "name": None},
            ],
        },
        "scheduler": {"last_epoch": 7, "base_lrs": [0.1], "_last_lr": [0.05]},
        "rng": gf.get_rng_state(),
        "epoch": 7,
        "loss": float("inf"),
        "note": "dotted.key and back\\slash",
        "empty": {},
        "nested": [[1, 2], (gf.arange(3), "x")],
    }


def _assert_same(got, want):
    assert type(got) is type(want)
    if isinstance(want, gf.Tensor):
        _same_tensor(got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same(a, b)
    else:
        assert got == want


def test_nested_round_trip(tmp_path):
    checkpoint = _checkpoint()
    gf.save(checkpoint, tmp_path / "ckpt.safetensors")
    _assert_same(gf.load(tmp_path / "ckpt.safetensors"), checkpoint)


def test_rng_state_restores_draws(tmp_path):
    gf.manual_seed(3)
    gf.save({"rng": gf.get_rng_state()}, tmp_path / "rng.safetensors")
    expected = gf.rand(5)
    gf.set_rng_state(gf.load(tmp_path / "rng.safetensors")["rng"])
    np.testing.assert_array_equal(to_host(gf.rand(5)), to_host(expected))


def test_colliding_keys_stay_apart(tmp_path):
    obj = {0: gf.ones(1), "0": gf.zeros(1), "a.b": {"c": gf.full((1,), 2.0)},
           "a": {"b.c": gf.full((1,), 3.0)}, "__metadata__": [gf.ones(2)]}
    gf.save(obj, tmp_path / "a.safetensors")
    _assert_same(gf.load(tmp_path / "a.safetensors"), obj)


def test_reserved_name_in_flat_dict(tmp_path):
    obj = {"__metadata__": gf.ones(2), "w": gf.zeros(2)}
    gf.save(obj, tmp_path / "a.safetensors")
    _assert_same(gf.load(tmp_path / "a.safetensors"), obj)


def test_numpy_scalars_become_numbers(tmp_path):
    gf.save({"a": np.float32(0.5), "b": np.int64(3)}, tmp_path / "a.safetensors")
    loaded = gf.load(tmp_path / "a.safetensors")
    assert loaded == {"a": 0.5, "b": 3}
    assert type(loaded["b"]) is int


def test_saves_values_not_graph(tmp_path):
    w = gf.tensor([1.0, 2.0], requires_grad=True)
    gf.save({"w": w}, tmp_path / "a.safetensors")
    loaded = gf.load(tmp_path / "a.safetensors")["w"]
    assert not loaded.requires_grad
    assert loaded.is_leaf


def test_loads_on_cpu_by_default(tmp_path, device):
    gf.save({"t": gf.ones(3, device=device)}, tmp_path / "a.safetensors")
    assert gf.load(tmp_path / "a.safetensors")["t"].device == gf.device("cpu")


def test_loads_onto_device(tmp_path, device):
    gf.save({"t": gf.arange(4.0)}, tmp_path / "a.safetensors")
    loaded = gf.load(tmp_path / "a.safetensors", device=device)["t"]
    assert loaded.device == device
    assert to_host(loaded).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_loaded_tensor_is_writable(tmp_path):
    gf.save({"t": gf.zeros(3)}, tmp_path / "a.safetensors")
    loaded = gf.load(tmp_path / "a.safetensors")["t"]
    loaded += 1
    assert to_host(loaded).tolist() == [1.0, 1.0, 1.0]


def test_accepts_str_path(tmp_path):
    path = str(tmp_path / "a.safetensors")
    gf.save({"t": gf.ones(1)}, path)
    assert gf.load(path)["t"].item() == 1.0


def test_rejects_unknown_value(tmp_path):
    with pytest.raises(TypeError, match=r"obj\['model'\]\['fn'\]"):
        gf.save({"model": {"fn": print}}, tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


def test_rejects_numpy_array(tmp_path):
    with pytest.raises(TypeError, match="ndarray"):
        gf.save({"a": np.ones(3)}, tmp_path / "a.safetensors")


def test_rejects_tuple_key(tmp_path):
    with pytest.raises(TypeError, match="keys must be str or int"):
        gf.save({(1, 2): 3}, tmp_path / "a.safetensors")


def test_rejects_complex_tensor(tmp_path):
    with pytest.raises(TypeError, match="complex"):
        gf.save({"z": gf.tensor(np.ones(2, dtype=np.complex64))}, tmp_path / "z")


# -- atomic writes --------------------------------------------------------------

def test_overwrites_existing(tmp_path):
    path = tmp_path / "a.safetensors"
    gf.save({"t": gf.zeros(2)}, path)
    gf.save({"t": gf.ones(3)}, path)
    assert to_host(gf.load(path)["t"]).tolist() == [1.0, 1.0, 1.0]
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    gf.save({"t": gf.zeros(2)}, path)
    before = path.read_bytes()

    def fail_midway(arrays, temporary, metadata):
        with open(temporary, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_serialization, "_write_tensors", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        gf.save({"t": gf.ones(2)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_failed_rename_removes_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"

    def fail(source, destination):
        raise PermissionError("rename denied")

    monkeypatch.setattr(_serialization.os, "replace", fail)
    with pytest.raises(PermissionError):
        gf.save({"t": gf.ones(2)}, path)
    assert os.listdir(tmp_path) == []


def test_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        gf.save({"t": gf.ones(1)}, tmp_path / "missing" / "a.safetensors")


def test_missing_directory_names_path(tmp_path):
    path = tmp_path / "missing" / "a.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        gf.save({"t": gf.ones(1)}, path)
    assert str(path) in str(info.value)
    assert ".tmp" not in str(info.value)
    assert "does not exist" in str(info.value)


def test_rejects_deep_nesting_on_save(tmp_path):
    obj = gf.ones(1)
    for _ in range(_serialization._MAX_DEPTH + 1):
        obj = [obj]
    with pytest.raises(ValueError, match="nested more than 100 levels"):
        gf.save(obj, tmp_path / "a.safetensors")


def test_saves_max_depth(tmp_path):
    obj = gf.ones(1)
    for _ in range(_serialization._MAX_DEPTH):
        obj = [obj]
    gf.save(obj, tmp_path / "a.safetensors")
    loaded = gf.load(tmp_path / "a.safetensors")
    for _ in range(_serialization._MAX_DEPTH):
        loaded = loaded[0]
    _same_tensor(loaded, gf.ones(1))


# -- rejected and damaged files -------------------------------------------------

class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > should_not_exist",))


def test_rejects_pickle_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": _Payload()}))
    with pytest.raises(ValueError, match="not a gradflow/safetensors file") as info:
        gf.load(path)
    assert str(path) in str(info.value)
    assert not (tmp_path / "should_not_exist").exists()


@pytest.mark.parametrize("content", [b"", b"abc", b"PK\x03\x04" + bytes(60),
                                     b"\x08\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]"])
def test_rejects_other_files(tmp_path, content):
    path = tmp_path / "f.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a gradflow/safetensors file"):
        gf.load(path)


@pytest.mark.parametrize("keep", [0.3, 0.9, -1])
def test_rejects_truncated(tmp_path, keep):
    path = tmp_path / "a.safetensors"
    gf.save(_checkpoint(), path)
    data = path.read_bytes()
    cut = int(len(data) * keep) if keep > 0 else len(data) - 1
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="truncated"):
        gf.load(path)


def test_rejects_flipped_tensor_byte(tmp_path):
    path = tmp_path / "a.safetensors"
    gf.save({"w": gf.zeros(64)}, path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest"):
        gf.load(path)


def test_rejects_bad_structure(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "a.safetensors"
    metadata = {"gradflow.format": "1", "gradflow.structure": '{"dict": 5}',
                "gradflow.sha256": _serialization._digest({})}
    safetensors_numpy.save_file({}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="structure metadata is invalid"):
        gf.load(path)


def _write_raw(path, structure, digest=True):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    metadata = {"gradflow.format": "1", "gradflow.structure": structure}
    if digest:
        metadata["gradflow.sha256"] = _serialization._digest({})
    safetensors_numpy.save_file({}, str(path), metadata=metadata)


@pytest.mark.parametrize("depth", [101, 100_000], ids=["past_bound", "past_json"])
def test_rejects_deep_structure(tmp_path, depth):
    path = tmp_path / "a.safetensors"
    _write_raw(path, '{"list":[' * depth + '{"value":1}' + "]}" * depth)
    with pytest.raises(ValueError, match="nested more than 100 levels deep"):
        gf.load(path)


def test_rejects_missing_digest(tmp_path):
    path = tmp_path / "a.safetensors"
    _write_raw(path, '{"value":1}', digest=False)
    with pytest.raises(ValueError, match="has no SHA-256 digest"):
        gf.load(path)


def _bfloat16_file(path):
    """Write a safetensors file holding one bfloat16 tensor "w" of shape (2,)."""
    header = b'{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))


def test_rejects_bfloat16(tmp_path):
    path = tmp_path / "bf16.safetensors"
    _bfloat16_file(path)
    with pytest.raises(ValueError) as info:
        gf.load(path)
    message = str(info.value)
    assert "stores tensor 'w' as bfloat16" in message
    assert "NumPy has no such dtype" in message
    assert "program that wrote the file" in message
    assert "corrupted" not in message


def test_rejects_newer_format(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "a.safetensors"
    safetensors_numpy.save_file({}, str(path), metadata={"gradflow.format": "99"})
    with pytest.raises(ValueError, match="format '99'"):
        gf.load(path)


def test_reads_plain_safetensors(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "plain.safetensors"
    safetensors_numpy.save_file({"w": np.arange(3, dtype=np.int32)}, str(path))
    loaded = gf.load(path)
    assert list(loaded) == ["w"]
    assert to_host(loaded["w"]).tolist() == [0, 1, 2]


# -- other readers --------------------------------------------------------------

def test_torch_reads_flat_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = {"0.weight": gf.randn(4, 3), "0.bias": gf.zeros(4, dtype=gf.float64),
             "mask": gf.tensor([True, False])}
    path = tmp_path / "model.safetensors"
    gf.save(state, path)
    loaded = safetensors_torch.load_file(str(path))
    assert sorted(loaded) == sorted(state)
    for key, t in state.items():
        np.testing.assert_array_equal(loaded[key].numpy(), to_host(t))
    assert loaded["0.bias"].dtype == torch.float64


def test_torch_reads_nested_names(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    pytest.importorskip("torch")
    path = tmp_path / "ckpt.safetensors"
    gf.save({"model": {"fc.weight": gf.ones(2)}, "opt": [gf.zeros(1)]}, path)
    loaded = safetensors_torch.load_file(str(path))
    assert sorted(loaded) == ["model.fc\\.weight", "opt.0"]
