"""`Distiller`: a student trained on knowledge distillation from a frozen teacher.

Loss (Hinton et al.), with temperature T and weight alpha:
    alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s)
for classifiers; per-output sigmoids for binary and multi-label models, and
mean squared errors for regression (see `tasks`). Computed in float32
whatever the models' dtype policy.
"""

import keras
import tensorflow as tf
from keras import ops

from dg2pf_tf.checks import check_alpha, check_temperature
from dg2pf_tf.procedure import tasks


@keras.saving.register_keras_serializable(package="dg2pf_tf")
class Distiller(keras.Model):
    """Trains `student` on the KD loss against a frozen `teacher`.

    Use like any Keras model: `compile(optimizer, metrics=[...])` (no `loss`:
    the KD loss is built in), then `fit`. Calling the distiller runs the
    student. The teacher runs in inference mode (BatchNorm statistics and
    Dropout frozen), gets no gradient, and has `trainable` set to False. With
    `teacher=None` (or `alpha=0`) the loss is plain cross-entropy. Labels may
    be sparse integers or one-hot; losses are averaged over the global batch,
    so results do not depend on the number of `tf.distribute` replicas.
    Logs: `loss` (total), `kd_loss`, `ce_loss` and the compiled metrics,
    which see the student's outputs.

    Keras (>= 3.12) ships `keras.distillation.Distiller`; this one is kept
    because DG2PF needs what that one does not do: students and teachers that
    output probabilities (softmax or sigmoid, turned back into logits), the
    binary and regression tasks, a loss averaged over the global batch under
    `tf.distribute` (so any number of replicas trains alike), no teacher at
    all for the phases after distillation, and `alpha` and `temperature` as
    the paper states them. For categorical logits the KD term is the same as
    Keras' `keras.distillation.LogitsDistillation(temperature,
    loss=keras.losses.KLDivergence())` (KL between the softened
    distributions, times T^2, averaged over the batch; its default
    `loss="kl_divergence"` skips the softmax and the T^2 in Keras 3.15); the
    tests hold the two equal.

    Args:
        student: the model to train.
        teacher: the frozen model to learn from, with the same outputs.
        temperature: T, softens both distributions (> 0).
        alpha: weight of the KD term, in [0, 1].
        from_logits: whether the models output logits; by default detected
            from each model's final activation (softmax or sigmoid means
            probabilities).
        task: 'categorical', 'binary' or 'regression' (see `dg2pf_tf.tasks`);
            by default binary for a sigmoid output, else categorical.

    Raises:
        TypeError: `student` or `teacher` is not a Keras model.
        ValueError: bad `temperature`, `alpha` or `task`.
    """

    def __init__(self, student, teacher=None, *, temperature=4.0, alpha=0.75,
                 from_logits=None, task=None, **kwargs):
        kwargs.setdefault("name", "distiller")
        super().__init__(**kwargs)
        for role, model in (("student", student), ("teacher", teacher)):
            if model is not None and not isinstance(model, keras.Model):
                raise TypeError(f"`{role}` must be a keras.Model, got {type(model).__name__}.")
        if student is None:
            raise TypeError("`student` must be a keras.Model, got None.")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.from_logits = from_logits
        activation = tasks.final_activation(student)
        if task is None:
            task = "binary" if activation == "sigmoid" else "categorical"
        self.task = tasks.get(task) if isinstance(task, str) else task
        self._student_probs = self._probabilities(student)
        self._teacher_probs = None if teacher is None else self._probabilities(teacher)
        self.kd_loss_tracker = keras.metrics.Mean(name="kd_loss")
        self.ce_loss_tracker = keras.metrics.Mean(name="ce_loss")

    def _probabilities(self, model):
        if self.from_logits is not None:
            return not self.from_logits
        return tasks.final_activation(model) is not None

    @property
    def uses_teacher(self):
        """True when the KD term is computed (a teacher and alpha > 0)."""
        return self.teacher is not None and self.alpha > 0

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compile(self, optimizer="adamw", metrics=None, **kwargs):
        """Configures training; takes no `loss` (the KD loss is built in)."""
        if kwargs.get("loss") is not None:
            raise ValueError(
                "Distiller computes its own loss; compile it without `loss` "
                "(set `temperature` and `alpha` on the Distiller)."
            )
        kwargs.pop("loss", None)
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def get_compile_config(self):
        """What `compile` was given (Keras saves it in a `.keras` file)."""
        return super().get_compile_config()

    def compile_from_config(self, config):
        """Compiles as the saved `config` says (Keras' own refuses a custom `compile`)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        student = self.task.logits(y_pred, self._student_probs)
        ce = self.task.label_loss(y, student)
        kd = None
        if self.uses_teacher:
            teacher = self.task.logits(ops.stop_gradient(self.teacher(x, training=False)),
                                       self._teacher_probs)
            kd = self.task.distill_loss(teacher, student, self.temperature)
        if sample_weight is not None:
            weight = ops.reshape(ops.cast(sample_weight, "float32"), ops.shape(ce))
            ce, kd = ce * weight, (kd * weight if kd is not None else None)
        ce = ops.mean(ce)
        kd = ops.mean(kd) if kd is not None else ops.zeros((), "float32")
        alpha = self.alpha if self.uses_teacher else 0.0
        total = alpha * kd + (1.0 - alpha) * ce
        self.kd_loss_tracker.update_state(kd)
        self.ce_loss_tracker.update_state(ce)
        # A per-replica mean: scale it to the global batch, as Keras losses do,
        # so summed replica gradients equal the single-device gradient.
        total = total / float(tf.distribute.get_strategy().num_replicas_in_sync)
        # Regularisation and `add_loss` terms: `Layer.losses` scales them for the
        # strategy already; summed in float32 as Keras' own `compute_loss` sums them.
        for loss in self.student.losses:
            total = total + ops.sum(ops.cast(loss, "float32"))
        return total

    def get_config(self):
        return {
            **super().get_config(),
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "from_logits": self.from_logits,
            "task": self.task.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        student = keras.saving.deserialize_keras_object(config.pop("student"))
        teacher = config.pop("teacher")
        teacher = None if teacher is None else keras.saving.deserialize_keras_object(teacher)
        return cls(student, teacher, **config)

