"""Tests of examples/train_digits.py: a short run in-process, MNIST files, --help."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import load_example

import gradflow as gf

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
# Four epochs of a 64-unit model at lr 1e-2 reach 0.93 to 0.96 test accuracy
# for seeds 0 to 3; 0.85 leaves room for BLAS rounding differences and is
# still far above the 0.10 of guessing one of ten classes.
TINY = ["--epochs", "4", "--hidden", "64", "--lr", "1e-2", "--device", "cpu", "--quiet"]
MIN_ACCURACY = 0.85


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    return load_example("train_digits")


@pytest.fixture(scope="module")
def tiny_run(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model.safetensors"
    return example.main(TINY + ["--out", str(out)])


def test_loss_falls(tiny_run):
    losses = tiny_run["epoch_losses"]
    assert len(losses) == 4
    assert losses[-1] < 0.5 * losses[0]


def test_accuracy_above_threshold(tiny_run):
    assert tiny_run["test_accuracy"] > MIN_ACCURACY


def test_stratified_split_sizes(tiny_run):
    assert tiny_run["train_size"] == 1437
    assert tiny_run["test_size"] == 360


def test_checkpoint_contents(tiny_run):
    checkpoint = gf.load(tiny_run["model_path"])
    assert sorted(checkpoint) == [
        "config", "model", "optimizer", "scheduler", "test_accuracy",
    ]
    assert checkpoint["model"]["0.weight"].shape == (64, 64)
    assert checkpoint["optimizer"]["state"][0]["step"] == 4 * 23
    assert checkpoint["config"]["hidden"] == 64


def test_checkpoint_reloads_model(example, tiny_run):
    checkpoint = gf.load(tiny_run["model_path"])
    model = example.build_model(64, 64, 10, gf.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    _, _, x_test, y_test = example.load_dataset(None, seed=0)
    accuracy = example.accuracy(model, gf.tensor(x_test), gf.tensor(y_test))
    assert accuracy == tiny_run["test_accuracy"]


def test_same_seed_same_result(example, tmp_path, tiny_run):
    again = example.main(TINY + ["--out", str(tmp_path / "again.safetensors")])
    assert again["epoch_losses"] == tiny_run["epoch_losses"]


def test_prints_results(example, tmp_path, capsys):
    example.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "m.safetensors")])
    output = capsys.readouterr().out
    assert "test accuracy:" in output
    assert "training time:" in output
    assert str(tmp_path / "m.safetensors") in output


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_fake_mnist(directory, rng):
    # Class c lights up row c of a noisy 10x10 image, so a few epochs
    # separate the classes.
    for prefix, count in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, 10, 10))
        images[np.arange(count), labels, :] = 255
        _write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)


def test_trains_on_mnist_files(example, tmp_path):
    _write_fake_mnist(tmp_path, np.random.default_rng(0))
    result = example.main([
        "--mnist-dir", str(tmp_path), "--epochs", "5", "--device", "cpu", "--quiet",
        "--lr", "1e-2", "--out", str(tmp_path / "m.safetensors"),
    ])
    assert result["train_size"] == 300
    assert result["test_size"] == 100
    assert result["test_accuracy"] > MIN_ACCURACY


def test_rejects_zero_epochs(example, capsys):
    with pytest.raises(SystemExit):
        example.main(["--epochs", "0"])
    assert "--epochs must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be a positive finite number, got -1.0"),
    (["--lr", "0"], "--lr must be a positive finite number, got 0.0"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--device", "tpu"], "--device: invalid device string 'tpu'"),
    (["--mnist-dir", "/nonexistent/mnist"],
     "--mnist-dir: directory /nonexistent/mnist not found"),
], ids=["negative_lr", "zero_lr", "nan_lr", "unknown_device", "missing_mnist_dir"])
def test_rejects_bad_option(example, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        example.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_rejects_cuda_without_gpu(example, capsys):
    if gf.cuda.is_available():
        pytest.skip("a CUDA GPU is usable here")
    with pytest.raises(SystemExit):
        example.main(["--device", "cuda"])
    assert "no usable CUDA GPU" in capsys.readouterr().err


def test_missing_mnist_files_exit_cleanly(example, tmp_path):
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte"):
        example.main(["--mnist-dir", str(tmp_path), "--quiet"])


def test_help_runs_as_script():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0
    assert "--mnist-dir" in result.stdout
    assert "--device" in result.stdout
