"""Files written by earlier versions: `.keras` files of pruned models load and compute what
they computed, and run checkpoints resume (tests/fixtures/legacy, made by its make.py)."""

import os
import shutil
import sys

import keras
import numpy as np
import pytest

import dg2pf_tf
from dg2pf_tf.procedure import checkpoint

LEGACY = os.path.join(os.path.dirname(__file__), "fixtures", "legacy")
sys.path.insert(0, LEGACY)
import make  # noqa: E402  (the fixtures' own settings and model)

EXPECTED = np.load(os.path.join(LEGACY, "expected.npz"))
NAMES = [name for name, _, _ in make.CASES]


@pytest.mark.parametrize("name", NAMES)
def test_a_pruned_keras_file_of_an_earlier_version_loads_and_computes_the_same(name):
    loaded = keras.models.load_model(os.path.join(LEGACY, f"pruned_{name}.keras"))
    assert isinstance(loaded, dg2pf_tf.PrunedModel)
    masks = np.concatenate([m.numpy().reshape(-1) for m in loaded.masks])
    np.testing.assert_array_equal(masks, EXPECTED[f"pruned_{name}_masks"])
    np.testing.assert_allclose(loaded(EXPECTED["inputs"], training=False), EXPECTED[f"pruned_{name}"],
                               rtol=0, atol=1e-5)
    # Its settings came back as they were given: the masks update as before.
    settings = dict(next(s for n, s, _ in make.CASES if n == name))
    settings.pop("sparsity", None)
    fresh = dg2pf_tf.prune(make.model(), **settings)
    for name_ in ("structure", "budget", "scope", "floor"):
        assert str(getattr(loaded, name_)) == str(getattr(fresh, name_))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_of_an_earlier_version_resumes_to_the_uninterrupted_result(name, tmp_path):
    settings = {**make.RUN, **next(s for n, s, _ in make.CASES if n == name)}
    directory = tmp_path / "backup"
    shutil.copytree(os.path.join(LEGACY, f"checkpoint_{name}"), directory)
    train, val = make.data()
    # Written with the linear schedule and the fine-tuning of its time: today's defaults are
    # refused, by name.
    with pytest.raises(checkpoint.CheckpointError,
                       match="finetune: True there, False now, schedule_power: 1.0 there, 3.0 now"):
        dg2pf_tf.run(make.model(), train, val, seed=3, backup_dir=directory, **settings)
    with pytest.raises(checkpoint.CheckpointError, match=r"different run \(finetune: True there, False now\)"):
        dg2pf_tf.run(make.model(), train, val, seed=3, backup_dir=directory, **settings, schedule_power=1.0)
    settings.update(schedule_power=1.0, finetune=True)
    resumed = dg2pf_tf.run(make.model(), train, val, seed=3, backup_dir=directory, **settings)
    assert resumed.history[make.INTERRUPTED_AT - 1]["epoch"] == make.INTERRUPTED_AT
    whole = dg2pf_tf.run(make.model(), train, val, seed=3, **settings)
    x = EXPECTED["inputs"]
    np.testing.assert_allclose(resumed.model(x, training=False), whole.model(x, training=False), atol=1e-4)
    np.testing.assert_allclose(whole.model(x, training=False), EXPECTED[f"run_{name}"], atol=1e-4)
