"""`PruneWrapper`: a Keras layer wrapper that masks its layer's kernels.

The wrapped layer runs unchanged, but every read of a pruned kernel inside its
`call` sees `kernel * mask` (through `keras.StatelessScope`), so any layer
whose kernel is a variable attribute works without re-implementing its math.

Two modes, switched by the non-trainable `hard` flag (a variable, so an
already traced training step follows the switch):
- simulated pruning with weight recovery (`hard == 0`): the forward pass uses
  `kernel * mask`, the gradient reaches every weight unchanged
  (straight-through), and masked weights keep their values;
- hard pruning (`hard == 1`): the gradient of masked weights is zero and a
  variable constraint, applied by every Keras optimizer after its update,
  keeps them exactly 0.
"""

import inspect

import keras
import tensorflow as tf
from keras import ops
from keras.src import backend as keras_backend

from dg2pf_tf import schedules
from dg2pf_tf.criteria import check_floor, check_scope

# Layer class -> names of its prunable kernel attributes. Subclasses match too.
PRUNABLE_KERNELS = (
    (keras.layers.SeparableConv1D, ("depthwise_kernel", "pointwise_kernel")),
    (keras.layers.SeparableConv2D, ("depthwise_kernel", "pointwise_kernel")),
    (keras.layers.Dense, ("kernel",)),
    (keras.layers.EinsumDense, ("kernel",)),
    (keras.layers.Conv1D, ("kernel",)),
    (keras.layers.Conv2D, ("kernel",)),
    (keras.layers.Conv3D, ("kernel",)),
    (keras.layers.Conv1DTranspose, ("kernel",)),
    (keras.layers.Conv2DTranspose, ("kernel",)),
    (keras.layers.Conv3DTranspose, ("kernel",)),
    (keras.layers.DepthwiseConv1D, ("kernel",)),
    (keras.layers.DepthwiseConv2D, ("kernel",)),
)


def prunable_kernel_names(layer):
    """Names of the kernel attributes of `layer` that can be pruned (may be empty)."""
    for cls, names in PRUNABLE_KERNELS:
        if isinstance(layer, cls):
            return names
    return ()


def copy_layer(layer):
    """A built copy of a prunable `layer` (same config, same weights).

    Raises ValueError if `layer` has not been built yet.
    """
    build_config = layer.get_build_config()
    if not layer.built or not build_config:
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) is not built, so "
            f"its weights cannot be copied. Call it on an input first."
        )
    new = layer.__class__.from_config(layer.get_config())
    new.build_from_config(build_config)
    new.set_weights(layer.get_weights())
    return new


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


@tf.custom_gradient
def _masked(value, mask, hard):
    """`value * mask`; the gradient passes to masked entries unless `hard` is 1."""

    def grad(upstream):
        return upstream * tf.maximum(mask, 1.0 - hard), None, None

    return value * mask, grad


@keras.saving.register_keras_serializable(package="dg2pf_tf")
class PruneWrapper(keras.layers.Wrapper):
    """Wraps a layer so that its kernels are pruned by non-trainable masks.

    `dg2pf_tf.prune()` puts these around every prunable layer of a Sequential
    or Functional model. In a subclassed model, wrap layers yourself:
    `self.fc = dg2pf_tf.PruneWrapper(keras.layers.Dense(10))`, then train with
    `dg2pf_tf.UpdateMasks(schedule)`.

    Args:
        layer: a layer with prunable kernels (see `PRUNABLE_KERNELS`).
        recovery: True for simulated pruning with weight recovery (masked
            weights keep their values and their gradient); False for hard
            pruning (masked weights are 0 and stay 0).
        schedule: the `dg2pf_tf.schedules` object `UpdateMasks()` uses when
            given none; it travels with the model through `.keras` files.
        scope: 'global' or 'layer', how `UpdateMasks` allocates sparsity.
        floor: with scope 'global', the share of its Erdos-Renyi-kernel
            allocation each kernel keeps whatever its magnitudes (0: pure
            global magnitude; see `criteria.magnitude_masks`).
        **kwargs: base layer arguments; `name` defaults to the layer's name.

    Raises:
        TypeError: `layer` has no prunable kernel or is already wrapped.
    """

    def __init__(self, layer, recovery=True, schedule=None, scope="global", floor=0.0,
                 **kwargs):
        if isinstance(layer, PruneWrapper):
            raise TypeError(f"Layer '{layer.name}' is already a PruneWrapper.")
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(f"PruneWrapper wraps a Keras layer, got {layer!r}.")
        names = prunable_kernel_names(layer)
        if not names:
            kinds = ", ".join(cls.__name__ for cls, _ in PRUNABLE_KERNELS)
            raise TypeError(
                f"Layer '{layer.name}' ({type(layer).__name__}) has no prunable "
                f"kernel. PruneWrapper takes one of: {kinds}."
            )
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        self.kernel_names = names
        self.recovery = bool(recovery)
        self.schedule = schedules.deserialize(schedule)
        self.scope = check_scope(scope)
        self.floor = check_floor(floor)
        self.supports_masking = layer.supports_masking
        self._layer_takes_training = "training" in inspect.signature(layer.call).parameters

    def build(self, input_shape=None):
        super().build(input_shape)
        masks = []
        self.hard = self.add_weight(
            name="hard",
            shape=(),
            initializer=keras.initializers.Constant(0.0 if self.recovery else 1.0),
            trainable=False,
            dtype="float32",
        )
        for name in self.kernel_names:
            kernel = self._kernel(name)
            mask = self.add_weight(
                name=f"{name}_mask",
                shape=kernel.shape,
                initializer="ones",
                trainable=False,
                dtype="float32",
            )
            kernel.constraint = _MaskConstraint(mask, self.hard, kernel.constraint)
            masks.append(mask)
        self.masks = masks
        self.built = True

    def _kernel(self, name):
        kernel = getattr(self.layer, name)
        if not isinstance(kernel, keras.Variable):
            raise TypeError(
                f"'{self.layer.name}.{name}' is not a variable (LoRA or "
                f"quantization enabled?); PruneWrapper needs a plain kernel."
            )
        return kernel

    @property
    def kernels(self):
        """The pruned kernel variables, in the order of `masks`."""
        return [self._kernel(name) for name in self.kernel_names]

    def effective_kernel(self, kernel, mask):
        """`kernel * mask` in value; its gradient is straight-through unless hard."""
        value = tf.convert_to_tensor(kernel)  # a read, not the variable
        return _masked(value, ops.cast(mask, value.dtype), ops.cast(self.hard, value.dtype))

    def call(self, inputs, training=None):
        outer = keras_backend.get_stateless_scope()
        scope = keras.StatelessScope(collect_losses=True, initialize_variables=False)
        if outer is not None:
            scope.state_mapping.update(outer.state_mapping)
        kernels = self.kernels
        for kernel, mask in zip(kernels, self.masks):
            scope.state_mapping[id(kernel)] = ops.cast(
                self.effective_kernel(kernel, mask), kernel.dtype
            )
        kwargs = {"training": training} if self._layer_takes_training else {}
        with scope:
            outputs = self.layer(inputs, **kwargs)
        for loss in scope.losses:
            self.add_loss(loss)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def strip(self):
        """A plain copy of the wrapped layer whose kernels hold `kernel * mask`."""
        layer = copy_layer(self.layer)
        pruned = {id(k): k.numpy() * m.numpy() for k, m in zip(self.kernels, self.masks)}
        for own, new in zip(self.layer.weights, layer.weights):
            if id(own) in pruned:
                new.assign(pruned[id(own)].astype(new.dtype))
        return layer

    def get_config(self):
        return {
            **super().get_config(),
            "recovery": self.recovery,
            "schedule": schedules.serialize(self.schedule),
            "scope": self.scope,
            "floor": self.floor,
        }
