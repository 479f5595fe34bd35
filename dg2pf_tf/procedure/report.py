"""What `run()` returns: the final model, the history and the report (`RunResult`)."""

import dataclasses
import time

import keras

from dg2pf_tf.core.shrink import shrink
from dg2pf_tf.core.strip import strip
from dg2pf_tf.core.summary import report_counts
from dg2pf_tf.procedure.evaluation import Evaluator


@dataclasses.dataclass
class RunResult:
    """What `run()` returns.

    Attributes:
        model: the pruned model, stripped: plain Keras layers, exact zeros
            (with structure 'channel', shrunk: the removed channels are gone).
        history: one dict per epoch (epoch, phase, sparsity, losses, the
            validation metric as `val_accuracy` or `val_mse`, `val_loss`).
        report: JSON-serialisable summary: task and metric, dense and pruned
            validation metric (`dense_val_accuracy`, ...), sparsity over the
            prunable weights, over the pruned ones and over all parameters,
            how many weights were prunable, pruned and left dense by choice,
            weights left entirely zero, what the structure removed (channels,
            the share of a cost budget), epochs and seconds per phase.
    """

    model: keras.Model
    history: list
    report: dict


def result(procedure, dense_metric, started):
    """The `RunResult` of a finished `runner.Procedure`: the stripped model (shrunk,
    where the structure shrinks), the history and the report; says it in a line."""
    config, output, state = procedure.config, procedure.data.output, procedure.state
    student, best = procedure.models.student, procedure.best
    stripped = strip(student)
    final = shrink(stripped) if config.structure.shrinks else stripped
    metric = output.task.metric
    final_metric, final_loss = Evaluator(final, output.task, output.probabilities)(procedure.data.val)
    masks = [m.numpy() for m in student.masks]
    report = {
        "task": output.task.name,
        "metric": metric,
        f"dense_val_{metric}": dense_metric,
        f"pruned_val_{metric}": final_metric,
        "pruned_val_loss": final_loss,
        "target_sparsity": config.sparsity,
        **report_counts(student, stripped),
        **procedure.masks.criterion().report(masks),
        **({"params_shrunk": final.count_params()} if config.structure.shrinks else {}),
        "best_epoch": best.epoch,
        "best_phase": best.phase,
        "epochs": dict(state.phase_epochs),
        "seconds": {**state.phase_seconds, "total": time.perf_counter() - started},
        "replicas": procedure.execution.strategy.num_replicas_in_sync,
    }
    if procedure.checkpoint is not None:
        procedure.checkpoint.mark_done(report)
    if config.structure.shrinks:
        procedure.say(f"[dg2pf] {report['channels_removed']:,} of {report['channels_total']:,} channels "
                      f"removed: {report['params_total']:,} -> {report['params_shrunk']:,} parameters")
    procedure.say(f"[dg2pf] done: {metric} {dense_metric:.4f} -> {final_metric:.4f}; "
                  f"{report['sparsity_prunable']:.2%} of {report['params_prunable']:,} prunable weights "
                  f"are zero ({report['params_dense_by_choice']:,} left dense by choice; best: epoch "
                  f"{best.epoch}, {best.phase})")
    return RunResult(model=final, history=state.rows, report=report)
