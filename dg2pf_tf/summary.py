"""`sparsity_summary`: where the zeros are, per kernel and in total."""

import dataclasses

import numpy as np

from dg2pf_tf.masking import find_wrappers
from dg2pf_tf.wrapper import PruneWrapper, prunable_kernel_names


@dataclasses.dataclass(frozen=True)
class KernelRow:
    """One prunable kernel: `layer` name, kernel attribute, shape and zero count."""

    layer: str
    kernel: str
    shape: tuple
    weights: int
    zeros: int

    @property
    def sparsity(self):
        return self.zeros / self.weights if self.weights else 0.0


@dataclasses.dataclass(frozen=True)
class SparsitySummary:
    """Per-kernel rows and totals over the prunable weights and over all parameters.

    `str(summary)` is a printable table; `summary.to_dict()` is JSON-friendly.
    Parameters are the model's weights (trainable or not, batch-norm
    statistics included) without the pruning masks themselves.
    """

    rows: tuple
    total_params: int
    total_zeros: int

    @property
    def prunable_weights(self):
        return sum(r.weights for r in self.rows)

    @property
    def prunable_zeros(self):
        return sum(r.zeros for r in self.rows)

    @property
    def prunable_sparsity(self):
        return self.prunable_zeros / self.prunable_weights if self.rows else 0.0

    @property
    def total_sparsity(self):
        return self.total_zeros / self.total_params if self.total_params else 0.0

    def to_dict(self):
        return {
            "layers": [
                {**dataclasses.asdict(r), "shape": list(r.shape), "sparsity": r.sparsity}
                for r in self.rows
            ],
            "prunable_weights": self.prunable_weights,
            "prunable_zeros": self.prunable_zeros,
            "prunable_sparsity": self.prunable_sparsity,
            "total_params": self.total_params,
            "total_zeros": self.total_zeros,
            "total_sparsity": self.total_sparsity,
        }

    def __str__(self):
        head = ("layer", "shape", "weights", "zeros", "sparsity")
        lines = [
            (f"{r.layer}/{r.kernel}", "x".join(map(str, r.shape)), f"{r.weights:,}",
             f"{r.zeros:,}", f"{r.sparsity:.2%}")
            for r in self.rows
        ]
        lines.append(("prunable weights", "", f"{self.prunable_weights:,}",
                      f"{self.prunable_zeros:,}", f"{self.prunable_sparsity:.2%}"))
        lines.append(("all parameters", "", f"{self.total_params:,}",
                      f"{self.total_zeros:,}", f"{self.total_sparsity:.2%}"))
        widths = [max(len(row[i]) for row in [head, *lines]) for i in range(5)]
        fmt = lambda row: "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )
        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, lines[:-2]), rule, *map(fmt, lines[-2:])])


def _zeros(array):
    return int(array.size - np.count_nonzero(array))


def sparsity_summary(model):
    """Counts the zeros of `model`, pruned (wrapped) or stripped.

    Rows cover the wrappers' kernels, as the forward pass sees them
    (`kernel * mask`); in a model without wrappers, every kernel of a prunable
    layer type. Returns a `SparsitySummary`.
    """
    wrappers = find_wrappers(model)
    rows, effective, bookkeeping = [], {}, set()
    for wrapper in wrappers:
        bookkeeping.add(id(wrapper.hard))
        for name, kernel, mask in zip(wrapper.kernel_names, wrapper.kernels, wrapper.masks):
            bookkeeping.add(id(mask))
            value = kernel.numpy() * mask.numpy()
            effective[id(kernel)] = value
            rows.append(KernelRow(wrapper.name, name, tuple(value.shape), value.size, _zeros(value)))
    if not wrappers:
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, PruneWrapper):
                continue
            for name in prunable_kernel_names(layer):
                value = getattr(layer, name).numpy()
                rows.append(KernelRow(layer.name, name, tuple(value.shape), value.size, _zeros(value)))

    total_params = total_zeros = 0
    for weight in model.weights:
        if id(weight) in bookkeeping:
            continue
        value = effective.get(id(weight))
        value = weight.numpy() if value is None else value
        total_params += value.size
        total_zeros += _zeros(value)
    return SparsitySummary(tuple(rows), total_params, total_zeros)
