"""Every Keras/TensorFlow internal dg2pf_tf relies on, each with why no public API serves.

Keeping them here is what lets the library follow Keras releases: when one of
these moves, this file is the only one to change.
"""

import dataclasses
import inspect
import sys

import keras


def sublayers(layer, recursive=False):
    """The layers inside `layer` (not itself), in tracking order, each once.

    Keras 3 has no public way to list the sublayers of an arbitrary layer
    (`Model.layers` is top-level only and absent from plain layers).
    """
    return list(layer._flatten_layers(include_self=False, recursive=recursive))


def stateless_scope():
    """The active `keras.StatelessScope`, or None.

    Keras exports the scope class but not the getter; a scope of ours must
    see the values an enclosing one substitutes.
    """
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    return get_stateless_scope()


def is_graph_model(model):
    """True for plain Sequential and Functional models: a layer graph that
    `clone_model` rebuilds layer by layer. Their subclasses (KerasHub
    backbones) are rebuilt from their own config, like subclassed models.

    `keras.Model` is also the base of subclassed models; the Functional class
    itself is not exported.
    """
    from keras.src.models.functional import Functional

    return type(model) in (keras.Sequential, Functional)


def producer(tensor):
    """The operation (layer) that produced symbolic `tensor`, or None.

    Keras keeps it on the tensor's private `_keras_history`; there is no
    public accessor.
    """
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def conv_lstm_cell_class():
    """The cell class of `ConvLSTM1D/2D/3D`, which holds their kernels.

    `keras.layers` exports the ConvLSTM layers but not their cell.
    """
    from keras.src.layers.rnn.conv_lstm import ConvLSTMCell

    return ConvLSTMCell


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of a layer (or operation) in a layer graph: the `operation`, its
    symbolic `inputs` and `outputs`, and the `args` and `kwargs` it was called with
    (symbolic tensors in place of values). Our own type, so that nothing outside this
    module reads Keras' node objects."""

    operation: object
    inputs: tuple
    outputs: tuple
    args: tuple
    kwargs: dict

    def arguments(self):
        """The call's arguments by the names of the operation's `call` parameters."""
        return inspect.signature(self.operation.call).bind(*self.args, **self.kwargs).arguments


def graph_nodes(model):
    """The layer calls of a Sequential or Functional `model` in execution order,
    as `LayerCall`s; None for a model that is not a layer graph (subclassed, or
    Sequential without an input).

    Keras 3's public API lists a model's layers but not how they are
    connected; the calls are the private `_nodes_by_depth` of the graph (a
    built Sequential keeps that graph in its private `_functional`), each a
    private `Node`.
    """
    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    by_depth = getattr(graph, "_nodes_by_depth", None)
    if by_depth is None:
        return None
    return [LayerCall(node.operation, tuple(node.input_tensors), tuple(node.outputs),
                      tuple(node.arguments.args), dict(node.arguments.kwargs))
            for depth in sorted(by_depth, reverse=True) for node in by_depth[depth] if not node.is_input]


def kerashub_feedforward(layer):
    """`(intermediate, output)`: the feed-forward Dense layers of a KerasHub
    `TransformerEncoder` `layer`, or None for any other layer.

    KerasHub keeps them in private attributes; its public API (the config's
    `intermediate_dim`) counts their units but does not reach their weights.
    """
    hub = sys.modules.get("keras_hub")  # a model holding KerasHub layers has imported it
    if hub is None or type(layer) is not hub.layers.TransformerEncoder:
        return None
    pair = (getattr(layer, "_feedforward_intermediate_dense", None),
            getattr(layer, "_feedforward_output_dense", None))
    return pair if all(isinstance(d, keras.layers.Dense) for d in pair) else None


def invoke_signature(signature):
    """Runs LiteRT `signature` (a `SignatureRunner` called once before) on the inputs
    it holds.

    Its public call resizes, allocates, and copies the inputs in and the outputs
    out every time: on one layer at high resolution the copies take as long as
    the layer, and a whole model pays them once. The interpreter's own `invoke()`
    runs the first signature only.
    """
    signature._interpreter_wrapper.Invoke(signature._subgraph_index)
