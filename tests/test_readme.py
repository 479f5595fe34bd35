"""The Python examples of the README and of docs/, taken from the files and run as written, in order."""

import os
import re

import keras
import numpy as np
import pytest

import dg2pf_tf
from helpers import ROOT

# Read in this order: later guides use what earlier examples made (a trained `model`, `pruned`).
DOCUMENTS = ["README.md", "docs/pruning.md", "docs/channels.md", "docs/nm.md", "docs/deployment.md",
             "docs/command_line.md", "docs/distributed.md", "docs/architecture.md"]


def _blocks(path):
    with open(os.path.join(ROOT, path)) as f:
        return [(path, block) for block in re.findall(r"```python\n(.*?)```", f.read(), re.S)]


BLOCKS = [block for path in DOCUMENTS for block in _blocks(path)]


def test_every_guide_is_read_here():
    guides = {f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md")}
    assert guides <= set(DOCUMENTS)


def _prelude():
    """What the examples assume a user has: a trained model and its data (digits)."""
    from zoo.data import digits_splits
    from zoo.models import small_cnn

    (x_train, y_train), (x_val, y_val), _ = digits_splits()
    keras.utils.set_random_seed(0)
    model = small_cnn()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=8, batch_size=64, verbose=0)
    # Eight epochs train the weights, not yet BatchNorm's slow moving statistics
    # (validation accuracy near chance): settle them so the model is a trained one.
    from dg2pf_tf.procedure.batchnorm import reestimate_batchnorm
    reestimate_batchnorm(model, [x_train[i:i + 64] for i in range(0, len(x_train), 64)])
    return {"model": model, "x": x_train, "y": y_train, "x_train": x_train, "y_train": y_train,
            "x_val": x_val, "y_val": y_val}


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    assert len(BLOCKS) >= 8
    monkeypatch.chdir(tmp_path)
    namespace = _prelude()
    for i, (path, block) in enumerate(BLOCKS):
        exec(compile(block, f"{path}, python block {i + 1}", "exec"), namespace)
    assert os.path.isfile("pruned.keras") and os.path.isfile("out/model_int8.tflite")
    assert namespace["result"].report["sparsity_prunable"] == pytest.approx(0.95, abs=1e-3)
    faster = namespace["faster"]  # half the MACs gone, as the shrunk model counts them
    from dg2pf_tf.channels.costs import model_macs
    report = faster.report
    assert report["budget"] == "macs" and report["budget_removed"] >= 0.5
    assert model_macs(faster.model) == round(report["budget_total"] * (1 - report["budget_removed"]))
    assert model_macs(dg2pf_tf.shrink(namespace["fast"])) <= 0.5 * model_macs(namespace["model"])
    assert "prunable weights" in capsys.readouterr().out
    small, model = namespace["small"], namespace["model"]
    assert small.count_params() < 0.5 * model.count_params()  # channels physically removed
    assert namespace["channels"].report["channels_removed"] > 0
    both = namespace["both"]  # zeros inside the surviving channels, no channel back
    assert [tuple(w.shape) for w in both.model.weights] == [tuple(w.shape) for w in small.weights]
    assert both.report["sparsity_prunable"] == pytest.approx(0.9, abs=1e-3)
    assert both.report["pruned_val_accuracy"] >= namespace["channels"].report["pruned_val_accuracy"] - 0.05
    sparse24 = namespace["sparse24"].report  # the first convolution has one input: dense
    assert sparse24["target_sparsity"] == 0.5 and sparse24["sparsity_pruned"] == 0.5
    assert sparse24["pruned_val_accuracy"] >= sparse24["dense_val_accuracy"] - 0.03
    pattern = dg2pf_tf.pattern_report(namespace["sparse24"].model, "2:4")
    assert pattern.broken == () and len(pattern.checked) == 3 and pattern.dense == ()
    loaded = keras.models.load_model("pruned.keras")
    x = namespace["x_val"][:8]
    np.testing.assert_allclose(loaded(x), namespace["plain"](x), atol=1e-6)
