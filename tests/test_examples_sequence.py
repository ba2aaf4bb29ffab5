"""The sequence-model examples, run end to end in a tiny configuration."""

import numpy as np
import pytest
from conftest import load_example


def _check_training(result, steps, prompt, sample_length):
    losses = result["losses"]
    assert len(losses) == steps
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert result["sample"].startswith(prompt)
    assert len(result["sample"]) == len(prompt) + sample_length


def test_char_lstm_example_trains(capsys):
    example = load_example("train_char_lstm")
    argv = ["--steps", "15", "--batch-size", "4", "--seq-len", "16",
            "--embed-size", "8", "--hidden-size", "32", "--num-layers", "2",
            "--dropout", "0.1", "--lr", "1e-2", "--log-every", "5",
            "--sample-length", "20", "--prompt", "MIRANDA."]
    result = example.main(argv)
    _check_training(result, 15, "MIRANDA.", 20)
    printed = capsys.readouterr().out
    assert printed.count(" loss ") == 3
    assert "--- sample" in printed


def test_char_lstm_windows_continue_streams():
    example = load_example("train_char_lstm")
    ids = np.arange(41)
    batches = example.stream_batches(ids, batch_size=2, seq_len=5)
    first_inputs, first_targets, first_restart = next(batches)
    second_inputs, _, second_restart = next(batches)
    assert first_restart and not second_restart
    assert first_inputs[1, 0] == 20
    assert np.array_equal(first_targets, first_inputs + 1)
    assert np.array_equal(second_inputs[:, 0], first_inputs[:, -1] + 1)


def test_char_vocabulary_rejects_unknown_character():
    example = load_example("train_char_lstm")
    vocab = example.CharVocabulary("abc")
    assert vocab.decode(vocab.encode("cab")) == "cab"
    with pytest.raises(ValueError, match=r"\['z'\]"):
        vocab.encode("az")


def test_tiny_transformer_example_trains(capsys):
    example = load_example("tiny_transformer")
    argv = ["--steps", "15", "--batch-size", "4", "--block-size", "16",
            "--d-model", "16", "--nhead", "2", "--num-layers", "1",
            "--lr", "1e-2", "--log-every", "5", "--sample-length", "20"]
    result = example.main(argv)
    _check_training(result, 15, "PROSPERO.\n", 20)
    assert capsys.readouterr().out.count(" loss ") == 3


def test_tiny_transformer_rejects_long_context():
    example = load_example("tiny_transformer")
    import gradflow as gf

    model = example.TinyTransformer(10, 4, 8, 2, 1, 0.0, gf.device("cpu"))
    with pytest.raises(ValueError, match="block_size=4"):
        model(gf.tensor(np.zeros((1, 5), dtype=np.int64)))
