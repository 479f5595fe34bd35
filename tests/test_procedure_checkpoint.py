"""Reliability: resume after a kill, atomic checkpoints, bad data refused, NaN stops,
multi-worker training on loopback, replicas that agree."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import dg2pf_tf
from dg2pf_tf import atomic
from dg2pf_tf.procedure import checkpoint
from helpers import ROOT, TWO_CPUS, run_python
from zoo.data import digits_arrays
from zoo.models import small_cnn

SMALL = {"sparsity": 0.9, "pruning_epochs": 2, "patience": 1, "max_epochs": 2, "batch_size": 64, "verbose": 0}


@pytest.fixture(scope="module")
def digits():
    (xtr, ytr), (xte, yte) = digits_arrays()
    return (xtr[:384], ytr[:384]), (xte[:192], yte[:192])


def _model():
    keras.utils.set_random_seed(0)
    model = small_cnn()
    model(np.zeros((1, 8, 8, 1), np.float32))
    return model


class _Interrupt(keras.callbacks.Callback):
    """Stops the process's run at the start of `epoch` (0-based), as a kill would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _same(a, b, atol=1e-4):
    wa, wb = a.model.get_weights(), b.model.get_weights()
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x == 0, y == 0)
        np.testing.assert_allclose(x, y, atol=atol)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(digits, tmp_path):
    train, val = digits
    whole = dg2pf_tf.run(_model(), train, val, seed=3, **SMALL)
    with pytest.raises(KeyboardInterrupt):
        dg2pf_tf.run(_model(), train, val, seed=3, backup_dir=tmp_path, callbacks=[_Interrupt(3)],
                     **SMALL)
    assert json.loads(bytes(np.load(tmp_path / "state.npz")["__header__"]))["state"]["epoch"] == 3
    resumed = dg2pf_tf.run(_model(), train, val, seed=3, backup_dir=tmp_path, **SMALL)
    _same(whole, resumed)
    assert [r["phase"] for r in resumed.history] == [r["phase"] for r in whole.history]
    # A finished backup directory gives the result again without training.
    batches = _Batches()
    again = dg2pf_tf.run(_model(), train, val, seed=3, backup_dir=tmp_path, callbacks=[batches], **SMALL)
    _same(whole, again, atol=0)
    assert batches.count == 0
    assert checkpoint.finished(tmp_path)["pruned_val_accuracy"] == resumed.report["pruned_val_accuracy"]


class _Batches(keras.callbacks.Callback):
    """Counts the training batches it sees."""

    count = 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1


# Every setting of RunConfig, changed: a checkpoint written with SMALL must refuse each.
CHANGED = {
    "sparsity": 0.8, "pruning_epochs": 3, "scope": "layer", "floor": 0.5, "temperature": 2.0,
    "alpha": 0.5, "patience": 2, "max_epochs": 3, "seed": 1, "batch_size": 32,
    "learning_rate": 1e-3, "weight_decay": 0.0, "clipnorm": None, "finetune_learning_rate": 1e-4,
    "finetune": True, "recovery": False, "mask_update_steps": 2, "recalibrate_bn": False,
    "bn_batches": 10, "steps_per_epoch": 4, "task": "binary", "structure": "channel",
    "budget": "params", "runtime": "litert", "latency_batch_size": 2, "latency_threads": 1,
    "distill_while_pruning": False, "schedule_power": 1.0,
}
# Settings that take others along: a budget other than channels needs channel structure,
# the latency fields a latency budget (and threads the LiteRT runtime), at a share of the
# small CNN's time its floors let go: at batch 2 in Keras the call's overhead is most of it.
_LATENCY = {"structure": "channel", "budget": "latency", "sparsity": 0.05}
ALONG = {"budget": {"structure": "channel"}, "runtime": _LATENCY, "latency_batch_size": _LATENCY,
         "latency_threads": {**_LATENCY, "runtime": "litert"}}


def test_every_run_setting_is_in_the_fingerprint():
    fields = {f.name for f in dataclasses.fields(dg2pf_tf.RunConfig)}
    # The number of replicas is in it too: its own test below needs two logical CPUs.
    assert fields == set(CHANGED)


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(CHANGED))
def test_a_resume_with_any_setting_changed_is_refused(setting, digits, tmp_path_factory):
    train, val = digits
    directory = tmp_path_factory.getbasetemp() / "one_epoch_checkpoint"
    if not (directory / checkpoint.STATE_FILE).exists():
        with pytest.raises(KeyboardInterrupt):
            dg2pf_tf.run(_model(), train, val, seed=0, backup_dir=directory, callbacks=[_Interrupt(1)],
                         **SMALL)
    if setting == "task":  # one-hot rows are also valid multi-hot labels of a binary task
        train, val = [(x, np.eye(10, dtype="float32")[y]) for x, y in (train, val)]
    with pytest.raises(checkpoint.CheckpointError, match=f"different run.*{setting}"):
        dg2pf_tf.run(_model(), train, val, backup_dir=directory,
                     **{"seed": 0, **SMALL, setting: CHANGED[setting], **ALONG.get(setting, {})})


@pytest.mark.slow
def test_corrupt_foreign_and_tampered_checkpoints_are_refused(digits, tmp_path):
    train, val = digits
    with pytest.raises(KeyboardInterrupt):
        dg2pf_tf.run(_model(), train, val, seed=0, backup_dir=tmp_path, callbacks=[_Interrupt(3)],
                     **SMALL)
    with pytest.raises(checkpoint.CheckpointError, match="different run.*sparsity"):
        dg2pf_tf.run(_model(), train, val, seed=0, backup_dir=tmp_path, **{**SMALL, "sparsity": 0.8})
    # Masks edited after they became final break the sparsity invariant.
    path = tmp_path / "state.npz"
    with np.load(path) as data:
        header = json.loads(bytes(data["__header__"]))
        arrays = {k[2:]: data[k] for k in data.files if k.startswith("a/")}
    student = dg2pf_tf.prune(_model())
    index = max((i for i, v in enumerate(student.variables) if "mask" in v.path),
                key=lambda i: np.prod(student.variables[i].shape))
    arrays[f"student/{index}"] = np.ones_like(arrays[f"student/{index}"])
    header.pop("format")
    checkpoint.save(tmp_path, header, arrays)
    with pytest.raises(checkpoint.CheckpointError, match="invariant"):
        dg2pf_tf.run(_model(), train, val, seed=0, backup_dir=tmp_path, **SMALL)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        dg2pf_tf.run(_model(), train, val, seed=0, backup_dir=tmp_path, **SMALL)


def test_a_latency_checkpoint_from_before_round_to_resumes_only_with_widths_one_at_a_time(tmp_path):
    written = {"budget": {"name": "latency", "runtime": "litert", "batch_size": 1, "threads": 2}}
    checkpoint.save(tmp_path, {"fingerprint": written}, {})
    then = dg2pf_tf.Latency(runtime="litert", threads=2, round_to=1)
    header, _ = checkpoint.load(tmp_path, {"budget": then.config()})
    assert header["fingerprint"] == written
    with pytest.raises(checkpoint.CheckpointError, match="round_to"):
        checkpoint.load(tmp_path, {"budget": dg2pf_tf.Latency(runtime="litert", threads=2).config()})


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    checkpoint.save(tmp_path, {"fingerprint": {}, "state": {"epoch": 1}}, {"w": np.ones(3)})

    def torn(f):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_atomic(tmp_path / checkpoint.STATE_FILE, torn)
    header, arrays = checkpoint.load(tmp_path, {})
    assert header["state"]["epoch"] == 1 and arrays["w"].tolist() == [1, 1, 1]
    assert os.listdir(tmp_path) == [checkpoint.STATE_FILE]


KILLED_WRITER = r"""
import sys, numpy as np
from dg2pf_tf import atomic
from dg2pf_tf.procedure import checkpoint
directory = sys.argv[1]
big = np.random.default_rng(0).normal(size=(2_000_000,)).astype(np.float32)
epoch = 0
while True:
    epoch += 1
    checkpoint.save(directory, {"fingerprint": {}, "state": {"epoch": epoch}}, {"w": big + epoch})
    print(epoch, flush=True)
"""


@pytest.mark.slow
def test_a_kill_while_writing_never_leaves_a_torn_checkpoint(tmp_path):
    for delay in (0.3, 0.7, 1.1):
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
                                 env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE)
        child.stdout.readline()  # one complete checkpoint exists
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        header, arrays = checkpoint.load(tmp_path, {})
        np.testing.assert_allclose(
            arrays["w"][:5] - header["state"]["epoch"],
            np.random.default_rng(0).normal(size=(2_000_000,)).astype(np.float32)[:5], atol=1e-4)
    checkpoint.save(tmp_path, {"fingerprint": {}, "state": {}}, {})
    assert os.listdir(tmp_path) == [checkpoint.STATE_FILE]  # the killed writers' leftovers went


@pytest.mark.slow
def test_a_resume_on_another_number_of_replicas_is_refused(tmp_path):
    out = run_python(TWO_CPUS + textwrap.dedent(f"""
        import keras, numpy as np, pytest, dg2pf_tf
        from dg2pf_tf import atomic
        from dg2pf_tf.procedure import checkpoint
        from test_procedure_checkpoint import SMALL, _Interrupt, _model
        from zoo.data import digits_arrays
        (x, y), (xv, yv) = digits_arrays()
        train, val = (x[:384], y[:384]), (xv[:192], yv[:192])
        with pytest.raises(KeyboardInterrupt):
            dg2pf_tf.run(_model(), train, val, seed=0, backup_dir={str(tmp_path)!r},
                         callbacks=[_Interrupt(1)], **SMALL)
        with strategy.scope():
            model = _model()
        with pytest.raises(checkpoint.CheckpointError, match="different run.*replicas"):
            dg2pf_tf.run(model, train, val, seed=0, backup_dir={str(tmp_path)!r}, strategy=strategy, **SMALL)
        print("refused")
    """), env={"PYTHONPATH": f"{ROOT}:{ROOT}/tests"})
    assert out.strip().endswith("refused")


@pytest.mark.slow
def test_steps_per_execution_trains_the_same_steps(digits):
    train, val = digits
    short = {**SMALL, "pruning_epochs": 1, "max_epochs": 1, "finetune": False}
    one = dg2pf_tf.run(_model(), train, val, seed=2, **short)
    four = dg2pf_tf.run(_model(), train, val, seed=2, steps_per_execution=4, **short)
    assert [r["phase"] for r in four.history] == [r["phase"] for r in one.history]
    _same(one, four)


def test_bad_data_is_refused_before_training(digits):
    (x, y), val = digits
    model = _model()
    with pytest.raises(ValueError, match=r"labels range over \[0, 12\].*\[0, 9\]"):
        dg2pf_tf.run(model, (x, np.where(y == 3, 12, y)), val, **SMALL)
    with pytest.raises(ValueError, match=r"shape \(8, 8\) but model 'small_cnn' takes \(8, 8, 1\)"):
        dg2pf_tf.run(model, (x[..., 0], y), val, **SMALL)
    with pytest.raises(ValueError, match="is empty"):
        dg2pf_tf.run(model, tf.data.Dataset.from_tensor_slices((x, y)).take(0).batch(8), val, **SMALL)
    with pytest.raises(ValueError, match="validation_data.*labels"):
        dg2pf_tf.run(model, (x, y), tf.data.Dataset.from_tensor_slices((val[0], val[1] + 10)).batch(8),
                     **SMALL)
    poisoned = x.copy()
    poisoned[5, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 input values are NaN"):
        dg2pf_tf.run(model, (poisoned, y), val, **SMALL)
    with pytest.raises(ValueError, match="validation_data"):
        dg2pf_tf.run(model, (x, y), None, **SMALL)


class _Poison(keras.callbacks.Callback):
    """Sets a BatchNorm scale of the student to NaN before step 3 of epoch 2."""

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == 1 and batch == 2:
            gamma = self.model.student.model.get_layer("bn1").gamma
            gamma.assign(np.full(gamma.shape, np.nan, np.float32))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(digits, tmp_path):
    train, val = digits
    with pytest.raises(FloatingPointError, match="epoch 2, step 3"):
        dg2pf_tf.run(_model(), train, val, seed=0, backup_dir=tmp_path, callbacks=[_Poison()], **SMALL)
    header, _ = checkpoint.load(tmp_path, json.loads(bytes(
        np.load(tmp_path / "state.npz")["__header__"]))["fingerprint"])
    assert header["state"]["epoch"] == 1
    assert checkpoint.finished(tmp_path) is None


def _train(*args, timeout=900):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SHORT_DEFAULT = ["--dense_epochs=8", "--pruning_epochs=3", "--max_epochs=2", "--patience=1",
                 "--tflite=false"]


@pytest.mark.slow
def test_the_default_run_killed_and_resumed_ends_like_an_uninterrupted_one(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = _train(*SHORT_DEFAULT, f"--output_dir={whole}")
    killed = _train(*SHORT_DEFAULT, f"--output_dir={resumed}")
    state = resumed / "backup" / "state.npz"
    deadline = time.time() + 600
    while time.time() < deadline:
        if state.exists():
            try:
                epoch = json.loads(bytes(np.load(state)["__header__"]))["state"]["epoch"]
            except Exception:  # mid-rename on a slow disk: look again
                epoch = 0
            if epoch >= 2:
                break
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (resumed / "report.json").exists()
    assert done.wait(timeout=900) == 0, done.stderr.read()[-3000:]
    again = _train(*SHORT_DEFAULT, f"--output_dir={resumed}")
    assert again.wait(timeout=900) == 0, again.stderr.read()[-3000:]
    assert "resuming" in again.stdout.read()
    a = keras.models.load_model(whole / "pruned.keras").get_weights()
    b = keras.models.load_model(resumed / "pruned.keras").get_weights()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x == 0, y == 0)
        np.testing.assert_allclose(x, y, atol=1e-4)
    finished = _train(*SHORT_DEFAULT, f"--output_dir={resumed}")
    assert finished.wait(timeout=120) == 0
    assert "holds a finished run" in finished.stdout.read()


WORKER = r"""
import json, os, sys
mode, out = sys.argv[1], sys.argv[2]
import tensorflow as tf
if mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
else:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras, numpy as np, dg2pf_tf
from zoo.data import digits_arrays
from zoo.models import small_cnn
(xtr, ytr), (xte, yte) = digits_arrays()
keras.utils.set_random_seed(0)
with strategy.scope():
    model = small_cnn()
    model(xtr[:1])
r = dg2pf_tf.run(model, (xtr[:256], ytr[:256]), (xte[:128], yte[:128]), sparsity=0.9,
                 pruning_epochs=2, patience=1, max_epochs=1, finetune=False, seed=0,
                 batch_size=64, strategy=strategy, verbose=0)
index = json.loads(os.environ.get("TF_CONFIG", '{"task": {"index": 0}}'))["task"]["index"]
np.savez(f"{out}-{index}.npz", *r.model.get_weights())
print(json.dumps({"replicas": r.report["replicas"], "loss": r.history[-1]["loss"]}))
"""


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _weights(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.mark.slow
def test_two_workers_on_loopback_train_identically_and_match_one_process(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for index in range(2):
        env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen([sys.executable, "-c", WORKER, "multi", str(tmp_path / "mw")],
                                        env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
    try:
        outputs = [w.communicate(timeout=600) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["replicas"] == 2
    run_python(WORKER.replace("sys.argv[1], sys.argv[2]", repr(("mirrored", str(tmp_path / "one")))))
    first, second = _weights(tmp_path / "mw-0.npz"), _weights(tmp_path / "mw-1.npz")
    single = _weights(tmp_path / "one-0.npz")
    for a, b, c in zip(first, second, single):
        np.testing.assert_array_equal(a, b)  # workers agree exactly
        np.testing.assert_array_equal(a == 0, c == 0)
        np.testing.assert_allclose(a, c, atol=1e-4)  # same global batch, one process
    kernels = [w for w in single if w.ndim > 1]
    zeros = sum(int(np.sum(w == 0)) for w in kernels)
    assert zeros == round(0.9 * sum(w.size for w in kernels))


def test_a_staged_directory_lands_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.tflite").write_text("old")
    with pytest.raises(RuntimeError, match="killed"), atomic.staged_directory(out) as staging:
        (tmp_path / staging / "model.tflite").write_text("new")
        raise RuntimeError("killed half-way")
    assert (out / "model.tflite").read_text() == "old"
    assert os.listdir(tmp_path) == ["export"]
    with atomic.staged_directory(out) as staging:
        (tmp_path / staging / "model.tflite").write_text("new")
        (tmp_path / staging / "export.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["export.json", "model.tflite"]
    assert (out / "model.tflite").read_text() == "new"
    assert os.listdir(tmp_path) == ["export"]


def test_a_checkpoint_from_before_the_budget_setting_still_resumes(tmp_path):
    from dg2pf_tf.procedure.checkpoint import load, save

    now = {"sparsity": 0.9, "budget": "channels", "replicas": 1}
    save(tmp_path, {"fingerprint": {"sparsity": 0.9, "replicas": 1}, "state": {}}, {})
    header, _ = load(tmp_path, now)
    assert header["fingerprint"] == {"sparsity": 0.9, "replicas": 1}
    with pytest.raises(checkpoint.CheckpointError, match="different run.*budget"):
        load(tmp_path, {**now, "budget": "macs"})
