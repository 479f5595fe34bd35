"""Checks that need a fresh interpreter: plain-Keras loading, several CPU replicas."""

import textwrap

import keras
import numpy as np
import pytest

import dg2pf_tf
from helpers import ROOT, TWO_CPUS, residual_cnn, run_python


@pytest.mark.slow
def test_stripped_model_loads_and_runs_without_dg2pf_tf(tmp_path, images):
    pruned = dg2pf_tf.prune(residual_cnn())
    dg2pf_tf.update_masks(pruned, 0.9)
    path = tmp_path / "stripped.keras"
    dg2pf_tf.strip(pruned).save(path)
    np.save(tmp_path / "x.npy", images[0])
    np.save(tmp_path / "y.npy", keras.ops.convert_to_numpy(pruned(images[0])))
    out = run_python(textwrap.dedent(f"""
        import sys, numpy as np, keras
        model = keras.models.load_model({str(path)!r})
        got = keras.ops.convert_to_numpy(model(np.load({str(tmp_path / "x.npy")!r})))
        assert "dg2pf_tf" not in sys.modules
        print(float(np.abs(got - np.load({str(tmp_path / "y.npy")!r})).max()))
    """))
    assert float(out.strip()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("structure, sparsity", [("unstructured", 0.8), ("2:4", 0.5)])
def test_mirrored_strategy_on_two_logical_cpus_trains_to_exact_sparsity(structure, sparsity):
    out = run_python(TWO_CPUS + textwrap.dedent(f"""
        import keras, numpy as np, dg2pf_tf
        from helpers import replicas_agree, residual_cnn
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 8, 8, 1)).astype("float32"); y = rng.integers(0, 10, 64)
        with strategy.scope():
            pruned = dg2pf_tf.prune(residual_cnn(), sparsity={sparsity}, pruning_epochs=2,
                                    structure={structure!r})
            pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = pruned.fit(x, y, batch_size=16, epochs=3, verbose=0,
                             callbacks=[dg2pf_tf.UpdateMasks()])
        dg2pf_tf.finalize(pruned)
        pruned.fit(x, y, batch_size=16, epochs=1, verbose=0)
        rows = [r for r in dg2pf_tf.sparsity_summary(pruned).rows if r.pruned]
        print(strategy.num_replicas_in_sync, sum(r.zeros for r in rows), sum(r.weights for r in rows),
              history.history["loss"][-1], replicas_agree(pruned))
    """), env={"PYTHONPATH": f"{ROOT}:{ROOT}/tests"})
    replicas, zeros, total, loss, agree = out.strip().splitlines()[-1].split()
    assert int(replicas) == 2
    assert int(zeros) == round(sparsity * int(total))
    assert np.isfinite(float(loss))
    assert agree == "True"


@pytest.mark.slow
def test_distillation_steps_and_mask_updates_agree_on_every_replica():
    out = run_python(TWO_CPUS + textwrap.dedent("""
        import keras, numpy as np, dg2pf_tf
        from dg2pf_tf.procedure.loop import EpochLoop
        from helpers import replicas_agree, residual_cnn
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(96, 8, 8, 1)).astype("float32"); y = rng.integers(0, 10, 96)
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
        with strategy.scope():
            teacher = residual_cnn()
            student = dg2pf_tf.prune(teacher, sparsity=0.8, pruning_epochs=2)
            distiller = dg2pf_tf.Distiller(student, teacher)
            distiller.compile(optimizer=keras.optimizers.AdamW(1e-2, clipnorm=0.5))
        loop = EpochLoop(strategy)
        calls = loop.callbacks(distiller, [dg2pf_tf.UpdateMasks(every_n_steps=1)],
                               epochs=2, steps=3, verbose=0)
        calls.on_train_begin()
        for epoch in range(2):
            loop.run_epoch(distiller, data, epoch, calls)
        print(replicas_agree(student), len(student.masks), dg2pf_tf.core.masking.mask_sparsity(student))
    """), env={"PYTHONPATH": f"{ROOT}:{ROOT}/tests"})
    agree, count, sparsity = out.strip().splitlines()[-1].split()
    assert agree == "True" and int(count) == 5  # stem, sep (depthwise + pointwise), dw, fc
    assert float(sparsity) == pytest.approx(0.8, abs=1e-3)
