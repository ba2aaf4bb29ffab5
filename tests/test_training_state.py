"""Training state that is never lost: exact resume, safe loading, atomic saving.

The run mirrors examples/train_digits.py at a smaller size: an MLP with two
hidden layers (plus dropout) trained by AdamW under a linear warm-up followed
by cosine decay, on synthetic 8x8 "digits", so the test needs no dataset.
Batches come from gf.randperm and dropout masks from gradflow's generator,
so an exact resume needs the random state as well as the model, optimizer
and scheduler.

Run as a script, this file is the fresh process of the resume test
(``resume``) and the process killed in the middle of a save (``save-slowly``).
"""

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gradflow as gf
from gradflow import _random, nn

SAMPLES = 256
BATCH = 32
STEPS = 24
SPLIT = 10  # the interrupted run stops after this many steps


def make_digits():
    """Return (images, labels): noisy copies of ten random 8x8 templates, over 16."""
    rng = np.random.default_rng(1234)
    templates = rng.uniform(0, 16, (10, 64))
    labels = rng.integers(0, 10, SAMPLES)
    images = templates[labels] + rng.normal(0, 2, (SAMPLES, 64))
    return gf.tensor(images / 16, dtype=gf.float32), gf.tensor(labels)


def _warmup_cosine(optimizer, warmup):
    schedules = gf.optim.lr_scheduler
    return schedules.SequentialLR(
        optimizer,
        [schedules.LinearLR(optimizer, start_factor=0.1, total_iters=warmup),
         schedules.CosineAnnealingLR(optimizer, T_max=STEPS - warmup)],
        [warmup],
    )


class Run:
    """Model, optimizer, scheduler and step counter of one training run."""

    def __init__(self, hidden=32):
        gf.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10),
        )
        self.optimizer = gf.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.scheduler = _warmup_cosine(self.optimizer, warmup=3)
        self.step = 0

    def train(self, images, labels, steps):
        for _ in range(steps):
            index = gf.randperm(SAMPLES)[:BATCH]
            loss = nn.functional.cross_entropy(self.model(images[index]), labels[index])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1

    def checkpoint(self):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _random.all_rng_states(),
            "step": self.step,
        }

    def restore(self, checkpoint):
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        _random.set_all_rng_states(checkpoint["rng"])
        self.step = checkpoint["step"]

    def parameters(self):
        state = self.model.state_dict()
        return {k: v.detach().numpy().copy() for k, v in state.items()}


def _uninterrupted():
    images, labels = make_digits()
    run = Run()
    run.train(images, labels, STEPS)
    return run


def _saved_after_split(path):
    images, labels = make_digits()
    run = Run()
    run.train(images, labels, SPLIT)
    gf.save(run.checkpoint(), path)
    return run


def _assert_same_parameters(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert np.array_equal(actual[name], expected[name]), name


def _run_script(*args, timeout=120):
    return subprocess.run(
        [sys.executable, __file__, *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )


# -- exact resume -----------------------------------------------------------


def test_resume_in_process_is_exact(tmp_path):
    expected = _uninterrupted().parameters()
    path = tmp_path / "ckpt.safetensors"
    _saved_after_split(path)
    images, labels = make_digits()
    run = Run()
    gf.manual_seed(99)  # the restore, not this seed, must decide what follows
    run.restore(gf.load(path))
    run.train(images, labels, STEPS - run.step)
    _assert_same_parameters(run.parameters(), expected)


def test_resume_in_fresh_process_is_exact(tmp_path):
    uninterrupted = _uninterrupted()
    checkpoint, final = tmp_path / "ckpt.safetensors", tmp_path / "final.safetensors"
    _saved_after_split(checkpoint)
    result = _run_script("resume", checkpoint, final)
    assert result.returncode == 0, result.stderr
    resumed = gf.load(final)
    _assert_same_parameters(
        {k: v.numpy() for k, v in resumed["model"].items()}, uninterrupted.parameters()
    )
    assert resumed["lr"] == uninterrupted.scheduler.get_last_lr()


def test_resume_without_rng_differs(tmp_path):
    # Shows that the random state matters, so the tests above can fail.
    expected = _uninterrupted().parameters()
    path = tmp_path / "ckpt.safetensors"
    _saved_after_split(path)
    images, labels = make_digits()
    run = Run()
    checkpoint = gf.load(path)
    del checkpoint["rng"]
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.train(images, labels, STEPS - SPLIT)
    actual = run.parameters()
    assert not all(np.array_equal(actual[k], expected[k]) for k in expected)


def _resume_main(checkpoint, final):
    images, labels = make_digits()
    run = Run()
    run.restore(gf.load(checkpoint))
    run.train(images, labels, STEPS - run.step)
    gf.save({"model": run.model.state_dict(), "lr": run.scheduler.get_last_lr()}, final)


# -- loading never runs code from the file ------------------------------------


class _CreatesMarker:
    """Unpickling this object opens (so creates) the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_works(tmp_path):
    # The payload used below really runs code when unpickled.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_CreatesMarker(str(marker)))).close()
    assert marker.exists()


def test_pickle_rejected_without_running(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "ckpt.pt"
    path.write_bytes(pickle.dumps({"model": _CreatesMarker(str(marker))}))
    pattern = r"is not a gradflow/safetensors file.*never\s+unpickles"
    with pytest.raises(ValueError, match=pattern):
        gf.load(path)
    assert not marker.exists()


def _write_npz(path):
    with open(path, "wb") as f:
        np.savez(f, weight=np.ones(3))


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(_write_npz, id="npz"),
        pytest.param(lambda p: p.write_text('{"weight": [1, 2, 3]}'), id="json"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_bytes(os.urandom(4096)), id="random-bytes"),
        pytest.param(lambda p: p.write_bytes((10**9).to_bytes(8, "little") + b"{}"),
                     id="huge-header"),
    ],
)
def test_other_formats_rejected(tmp_path, write):
    path = tmp_path / "ckpt.bin"
    write(path)
    with pytest.raises(ValueError, match=r"^gf\.load: .*ckpt\.bin (is not a gradflow"
                       r"/safetensors file|is truncated)"):
        gf.load(path)


# -- truncated and corrupted files -------------------------------------------


@pytest.fixture
def saved_run(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    run = _saved_after_split(path)
    return run, path


def _header_length(path):
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("keep", ["4", "header-half", "data-half", "all-but-one"])
def test_truncated_file_rejected(saved_run, keep):
    run, path = saved_run
    data = path.read_bytes()
    header_end = 8 + _header_length(path)
    cut = {
        "4": 4, "header-half": header_end // 2,
        "data-half": (header_end + len(data)) // 2, "all-but-one": len(data) - 1,
    }[keep]
    path.write_bytes(data[:cut])
    before = run.parameters()
    pattern = r"^gf\.load: .* (is truncated|is not a gradflow)"
    with pytest.raises(ValueError, match=pattern):
        run.restore(gf.load(path))
    _assert_same_parameters(run.parameters(), before)


def test_flipped_data_byte_rejected(saved_run):
    run, path = saved_run
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0xFF
    path.write_bytes(bytes(data))
    before = run.parameters()
    pattern = r"is corrupted: its tensor data does not match"
    with pytest.raises(ValueError, match=pattern):
        run.restore(gf.load(path))
    _assert_same_parameters(run.parameters(), before)


def test_corrupted_header_rejected(saved_run):
    run, path = saved_run
    data = path.read_bytes()
    header_end = 8 + _header_length(path)
    header = data[8:header_end].replace(b'"dtype":"F32"', b'"dtype":"Q32"', 1)
    assert header != data[8:header_end]
    path.write_bytes(data[:8] + header + data[header_end:])
    with pytest.raises(ValueError, match=r"^gf\.load: .* is truncated or corrupted"):
        gf.load(path)


def test_misshaped_checkpoint_changes_nothing(saved_run, tmp_path):
    run, _ = saved_run
    state = dict(run.model.state_dict())
    state["5.bias"] = gf.zeros(11)
    path = tmp_path / "bad.safetensors"
    gf.save(state, path)
    before = run.parameters()
    with pytest.raises(RuntimeError, match=r"'5\.bias': shape \(11,\)"):
        run.model.load_state_dict(gf.load(path))
    _assert_same_parameters(run.parameters(), before)


# -- a save killed in the middle leaves the previous file intact ---------------


def _save_slowly_main(path, ready):
    """Start saving a large state to ``path``, stop halfway and wait to be killed."""
    import safetensors.numpy

    def half_written(arrays, filename, metadata=None):
        data = safetensors.numpy.save(arrays, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        open(ready, "w").close()
        time.sleep(120)

    safetensors.numpy.save_file = half_written
    gf.save({"weight": gf.randn(1024, 1024)}, path)


def _wait_for(path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_killed_save_keeps_previous_file(tmp_path):
    path, ready = tmp_path / "ckpt.safetensors", tmp_path / "ready"
    previous = {"weight": gf.arange(6, dtype=gf.float32)}
    gf.save(previous, path)
    child = subprocess.Popen(
        [sys.executable, __file__, "save-slowly", str(path), str(ready)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        started = _wait_for(ready, timeout=60)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        _, stderr = child.communicate(timeout=30)
    assert started, stderr
    assert child.returncode == -signal.SIGKILL
    partial = list(tmp_path.glob(".ckpt.safetensors.*.tmp"))
    assert len(partial) == 1  # the killed write really was underway
    assert gf.load(path)["weight"].numpy().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"resume": _resume_main, "save-slowly": _save_slowly_main}[command](*arguments)
