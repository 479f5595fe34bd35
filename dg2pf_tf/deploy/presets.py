"""Presets: which layers to prune for a given inference engine.

    pruned = dg2pf_tf.prune(model, 0.9, exclude=dg2pf_tf.presets.xnnpack)
    dg2pf_tf.run(model, train, val, sparsity=0.9, exclude=dg2pf_tf.presets.xnnpack)
"""

import keras


def xnnpack(layer):
    """`exclude` predicate for XNNPACK's sparse inference (LiteRT on ARM CPUs).

    Returns True (keep dense) for every layer except 1x1 stride-1 ungrouped
    `Conv2D`s: those are the only kernels XNNPACK runs sparse, and it does so
    only when more than 2/3 of their weights are zero; the stem, depthwise
    convolutions and the classifier run dense whatever their zeros, so
    pruning them only costs accuracy. Check the result with
    `dg2pf_tf.deploy_report(model)` and export with
    `dg2pf_tf.export(model, path, explicit_padding=True)`.
    """
    if type(layer) is not keras.layers.Conv2D and not (
        isinstance(layer, keras.layers.Conv2D)
        and not isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D))
    ):
        return True
    return not (
        tuple(layer.kernel_size) == (1, 1)
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.groups == 1
    )
