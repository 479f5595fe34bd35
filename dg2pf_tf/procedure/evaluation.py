"""`evaluate()`: a model's validation metric and loss over a dataset, for its task."""

import tensorflow as tf

from dg2pf_tf.procedure import tasks
from dg2pf_tf.procedure.data import first_batch


def evaluate(model, data, task="auto"):
    """`(metric, mean loss)` of `model` over batched `data` of `(x, y)`.

    For a classifier (softmax or logits; sparse or one-hot labels) that is
    `(top-1 accuracy, cross-entropy)`; for binary and multi-label models
    `(share of outputs on the right side of 0.5, binary cross-entropy)`; for
    regression `(MSE, MSE)`. `task` as in `dg2pf_tf.run`.

    Raises ValueError if `data` yields no example or `task` is unknown.
    """
    return Evaluator(model, task, data=data)(data)


class Evaluator:
    """`evaluate()` for one model, its traced step reused across calls.

    `task` is a `tasks.Task` (then `probabilities` says whether the model
    outputs probabilities), or a task name or 'auto', inferred from the
    first batch of `data`.
    """

    def __init__(self, model, task="auto", probabilities=None, *, data=None):
        if not isinstance(task, tasks.Task):
            x, y = first_batch(data, "validation data")
            task, probabilities = tasks.infer(model, model(x, training=False), y, task)
        self.task = task

        @tf.function(reduce_retracing=True)
        def step(x, y):
            logits = task.logits(model(x, training=False), probabilities)
            return (tf.reduce_sum(task.metric_values(y, logits)),
                    tf.reduce_sum(task.label_loss(y, logits)),
                    tf.cast(tf.shape(logits)[0], tf.float32))

        self._step = step

    def __call__(self, data):
        metric = loss = count = 0.0
        for batch in data:
            m, l, n = self._step(batch[0], batch[1])
            metric, loss, count = metric + float(m), loss + float(l), count + float(n)
        if count == 0:
            raise ValueError("evaluate(): the data yielded no example.")
        return metric / count, loss / count
