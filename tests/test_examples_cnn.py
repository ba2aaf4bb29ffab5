"""The CNN, fine-tuning and gradient-accumulation examples, in tiny configurations."""

import math

import conftest
import pytest

import gradflow as gf


@pytest.fixture
def load_example():
    """Return a function that imports an example script by module name."""
    pytest.importorskip("sklearn")
    return conftest.load_example


def test_cnn_digits_learns(load_example, capsys):
    example = load_example("train_cnn_digits")
    results = example.main(["--epochs", "2", "--train-limit", "300"])
    assert all(math.isfinite(loss) for loss in results["losses"])
    assert results["losses"][1] < results["losses"][0]
    assert results["test_accuracy"] > 0.5
    assert "test accuracy" in capsys.readouterr().out


def test_finetune_keeps_frozen_parameters(load_example):
    example = load_example("finetune_frozen")
    results = example.main(["--pretrain-epochs", "1", "--finetune-epochs", "1",
                            "--train-limit", "300"])
    assert results["frozen_parameters"] == 4
    assert results["trainable_parameters"] == 2


def test_finetune_check_detects_change(load_example):
    example = load_example("finetune_frozen")
    model = example.build_model()
    frozen = example.freeze_all_but_last(model)
    model[0].weight.data[0, 0, 0, 0] += 1
    with pytest.raises(RuntimeError, match="changed"):
        example.check_frozen(model, frozen)


def test_finetune_check_detects_gradient(load_example):
    example = load_example("finetune_frozen")
    model = example.build_model()
    frozen = example.freeze_all_but_last(model)
    model[0].weight.grad = gf.zeros(*model[0].weight.shape)
    with pytest.raises(RuntimeError, match="received a gradient"):
        example.check_frozen(model, frozen)


def test_grad_accumulation_matches(load_example):
    example = load_example("grad_accumulation")
    results = example.main(["--steps", "2"])
    assert max(results["grad_differences"]) <= results["tolerance"]
    assert max(results["param_differences"]) <= results["tolerance"]
    assert results["unweighted_ratio"] > 3
