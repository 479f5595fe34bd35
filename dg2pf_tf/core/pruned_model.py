"""`PrunedModel`: any Keras model, its prunable weights read through masks.

Calling a `PrunedModel` runs the model it holds inside a `keras.StatelessScope`
that maps every target weight to `weight * mask`. Every read of that weight
during the call sees the masked value, however deep the layer that reads it
(attention projections inside `MultiHeadAttention`, recurrent kernels inside
`LSTM` and `Bidirectional`, a user's own layers, ops in a Functional graph,
subclassed models), without re-implementing any layer's math. State the model
updates during the call (BatchNorm statistics, dropout seeds) is written back
to its variables on the way out.

Two modes, switched by the non-trainable `hard` flag (a variable, so an
already traced training step follows the switch):
- simulated pruning with weight recovery (`hard == 0`): the forward pass uses
  `weight * mask`, the gradient reaches every weight unchanged
  (straight-through), and masked weights keep their values;
- hard pruning (`hard == 1`): the gradient of masked weights is zero and a
  variable constraint, applied by every Keras optimizer after its update,
  keeps them exactly 0.
"""

import keras
import tensorflow as tf
from keras import ops

from dg2pf_tf import _compat, settings
from dg2pf_tf.checks import check_floor, check_scope
from dg2pf_tf.core import schedules
from dg2pf_tf.model.clone import build_like


class _MaskConstraint:
    """Applies the user's constraint, then zeroes masked weights in hard mode."""

    def __init__(self, mask, hard, inner=None):
        self.mask, self.hard, self.inner = mask, hard, inner

    def __call__(self, weight):
        if self.inner is not None:
            weight = self.inner(weight)
        # A branch, not arithmetic: in recovery mode this costs no tensor op.
        return tf.cond(
            self.hard > 0.5,
            lambda: weight * ops.cast(self.mask, weight.dtype),
            lambda: tf.identity(weight),
        )


def _masked(value, mask, hard):
    """`value * mask`; the gradient passes to masked entries unless `hard` is 1.

    A branch on the `hard` flag, so each mode pays only for itself: hard masks
    are one product (whose gradient is masked too); recovery adds the
    straight-through term. `stop_gradient` rather than `tf.custom_gradient`,
    which in graph mode registers a gradient function globally on every trace
    and so keeps every traced graph alive. The sum is exact: x + (0 - x) is 0.
    """
    return tf.cond(hard > 0.5, lambda: value * mask,
                   lambda: value + tf.stop_gradient(value * mask - value))


@keras.saving.register_keras_serializable(package="dg2pf_tf")
class PrunedModel(keras.Model):
    """A model whose target weights are pruned by non-trainable masks.

    `dg2pf_tf.prune()` makes these; use them as the model they hold: `fit`,
    `evaluate`, `save`, inside other models, as a `Distiller` student. Masks
    start at 1; `UpdateMasks` or `update_masks` set them, `finalize` makes
    them hard, `strip` returns the held model with the pruned weights zeroed.

    Args:
        model: the built Keras model to prune (kept, not copied: `prune()`
            passes a copy).
        targets: indices into `model.weights` of the weights to prune.
        recovery: simulated pruning with weight recovery if True (masked
            weights keep their values and their gradient), hard if False.
        schedule: the `dg2pf_tf.schedules` object `UpdateMasks()` uses when
            given none; it travels with the model through `.keras` files.
        scope: 'global' or 'layer', how masks allocate sparsity.
        floor: with scope 'global', the share of its Erdos-Renyi-kernel
            allocation each weight keeps (see `reference.magnitude_masks`);
            with structure 'channel', of its uniform share each channel group keeps.
        structure: what masks remove, a `settings.Structure` or its string:
            'unstructured' (single weights), 'channel' (whole channels of
            coupled groups, see `dg2pf_tf.channel_groups`) or an N:M pattern.
        budget: with structure 'channel', what a sparsity level is a share
            of: a `settings.Budget` or 'channels', 'macs', 'params' (see
            `dg2pf_tf.prune`).
        **kwargs: base model arguments; `name` defaults to the model's.

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: `targets` is empty or does not index float weights of
            `model`; bad `scope`, `floor`, `structure` or `budget`.
    """

    def __init__(self, model, targets, *, recovery=True, schedule=None, scope="global",
                 floor=1.0, structure="unstructured", budget="channels", **kwargs):
        if not isinstance(model, keras.Model):
            raise TypeError(f"PrunedModel holds a keras.Model, got {type(model).__name__}.")
        kwargs.setdefault("name", model.name)
        super().__init__(**kwargs)
        self.model = model
        self.target_indices = tuple(int(i) for i in targets)
        if not self.target_indices:
            raise ValueError("PrunedModel needs at least one target weight.")
        self.recovery = bool(recovery)
        self.schedule = schedules.deserialize(schedule)
        self.scope = check_scope(scope)
        self.floor = check_floor(floor)
        self.structure = settings.structure(structure)
        self.budget = settings.budget(budget, self.structure)
        if model.built:
            self._make_masks()

    def _make_masks(self):
        weights = self.model.weights
        bad = [i for i in self.target_indices if not 0 <= i < len(weights)
               or "float" not in str(weights[i].dtype)]
        if bad:
            raise ValueError(
                f"PrunedModel targets {bad} are not float weights of model '{self.model.name}' "
                f"(it has {len(weights)} weights).")
        self.hard = self.add_weight(
            name="hard", shape=(), trainable=False, dtype="float32", autocast=False,
            initializer=keras.initializers.Constant(0.0 if self.recovery else 1.0))
        masks = []
        for variable in self.targets:
            mask = self.add_weight(
                name=variable.path.replace("/", "__") + "__mask", shape=variable.shape,
                initializer="ones", trainable=False, dtype="float32", autocast=False)
            variable.constraint = _MaskConstraint(mask, self.hard, variable.constraint)
            masks.append(mask)
        self.masks = masks
        self.built = True

    @property
    def targets(self):
        """The pruned weights (variables of the held model), in the order of `masks`."""
        weights = self.model.weights
        return [weights[i] for i in self.target_indices]

    def call(self, *args, training=None, **kwargs):
        outer = _compat.stateless_scope()
        scope = keras.StatelessScope(collect_losses=True, initialize_variables=False)
        if outer is not None:
            scope.state_mapping.update(outer.state_mapping)
        for variable, mask in zip(self.targets, self.masks):
            value = tf.convert_to_tensor(variable)  # a read (the enclosing scope's value, if any)
            masked = _masked(value, ops.cast(mask, value.dtype), ops.cast(self.hard, value.dtype))
            scope.state_mapping[id(variable)] = ops.cast(masked, variable.dtype)
        given = dict(scope.state_mapping)
        with scope:
            outputs = self.model(*args, training=training, **kwargs)
        self._write_back(scope, given, outer)
        for loss in scope.losses:
            self.add_loss(loss)
        return outputs

    def _write_back(self, scope, given, outer):
        """Carries the state the call updated (BatchNorm statistics, seeds) to the variables."""
        changed = [key for key, value in scope.state_mapping.items() if given.get(key) is not value]
        if not changed:
            return
        known = {id(v): v for v in self.model.variables}
        for key in changed:
            variable = known.get(key)
            if variable is None:
                raise RuntimeError(
                    f"Model '{self.model.name}' updated a variable that is not one of its own "
                    f"during its call (a metric?); PrunedModel cannot carry that update out "
                    f"of its mask scope. Keep such state outside the model.")
            if outer is not None:
                outer.add_update((variable, scope.state_mapping[key]))
            else:
                variable.assign(scope.state_mapping[key])

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "model": keras.saving.serialize_keras_object(self.model),
            "targets": list(self.target_indices),
            "recovery": self.recovery,
            "schedule": schedules.serialize(self.schedule),
            "scope": self.scope,
            "floor": self.floor,
            "structure": str(self.structure),
            "budget": self.budget.config(),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        return cls(model, config.pop("targets"), **config)

    def get_build_config(self):
        return {"model": self.model.get_build_config()}

    def build_from_config(self, config):
        """Builds a held subclassed model (as `.keras` loading needs), then the masks."""
        inner = (config or {}).get("model")
        if not self.model.built and inner:
            build_like(self.model, inner)
        if not self.model.built:
            raise ValueError(f"PrunedModel: model '{self.model.name}' cannot be built from its config.")
        if not hasattr(self, "masks"):
            self._make_masks()
