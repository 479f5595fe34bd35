"""`sparsity_summary`: where the zeros are, per prunable weight and in total.

One definition everywhere: a model's *prunable* weights are the weights of a
prunable kind (what `prune()` can reach), whether they were pruned or left
dense by choice (`exclude`). So the summary of a pruned model and of its
stripped copy agree; a pruned model also says which weights carry masks.
"""

import dataclasses

from dg2pf_tf import settings
from dg2pf_tf.core.masking import pruned_models
from dg2pf_tf.counting import count_zeros
from dg2pf_tf.criteria.reference import nm_violations
from dg2pf_tf.model import layer_kinds
from dg2pf_tf.model.walk import find_prunable


@dataclasses.dataclass(frozen=True)
class KernelRow:
    """One prunable weight: its variable `path`, `layer` name, attribute `kernel`,
    shape, size, zero count, and `pruned`: True under a mask, False left dense by
    choice, None in a model without masks (not known)."""

    path: str
    layer: str
    kernel: str
    shape: tuple
    weights: int
    zeros: int
    pruned: object = None

    @property
    def sparsity(self):
        return self.zeros / self.weights if self.weights else 0.0


@dataclasses.dataclass(frozen=True)
class SparsitySummary:
    """Per-weight rows and totals over the prunable weights and over all parameters.

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
        """Zeros over every prunable weight, pruned or left dense by choice."""
        return self.prunable_zeros / self.prunable_weights if self.rows else 0.0

    @property
    def pruned_weights(self):
        """Weights under masks (0 in a model without masks)."""
        return sum(r.weights for r in self.rows if r.pruned)

    @property
    def pruned_sparsity(self):
        """Zeros over the weights under masks: the level the masks were set to."""
        weights = self.pruned_weights
        return sum(r.zeros for r in self.rows if r.pruned) / weights if weights else 0.0

    @property
    def dense_by_choice(self):
        """Prunable weights a pruned model leaves dense (`exclude`)."""
        return sum(r.weights for r in self.rows if r.pruned is False)

    @property
    def dead(self):
        """Paths of the prunable weights that are entirely zero."""
        return tuple(r.path for r in self.rows if r.weights and r.zeros == r.weights)

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
            "pruned_weights": self.pruned_weights,
            "pruned_sparsity": self.pruned_sparsity,
            "dense_by_choice": self.dense_by_choice,
            "dead": list(self.dead),
            "total_params": self.total_params,
            "total_zeros": self.total_zeros,
            "total_sparsity": self.total_sparsity,
        }

    def __str__(self):
        head = ("weight", "shape", "weights", "zeros", "sparsity", "")
        state = {True: "pruned", False: "dense by choice", None: ""}
        lines = [
            (r.path, "x".join(map(str, r.shape)), f"{r.weights:,}", f"{r.zeros:,}",
             f"{r.sparsity:.2%}", state[r.pruned])
            for r in self.rows
        ]
        lines.append(("prunable weights", "", f"{self.prunable_weights:,}",
                      f"{self.prunable_zeros:,}", f"{self.prunable_sparsity:.2%}", ""))
        if self.pruned_weights:
            lines.append(("  of which pruned", "", f"{self.pruned_weights:,}", "",
                          f"{self.pruned_sparsity:.2%}", ""))
        lines.append(("all parameters", "", f"{self.total_params:,}",
                      f"{self.total_zeros:,}", f"{self.total_sparsity:.2%}", ""))
        widths = [max(len(row[i]) for row in [head, *lines]) for i in range(6)]
        fmt = lambda row: "  ".join(  # noqa: E731
            c.ljust(w) if i in (0, 1, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()
        rule = "-" * max(len(fmt(row)) for row in [head, *lines])
        totals = len(lines) - len(self.rows)
        text = [fmt(head), rule, *map(fmt, lines[:-totals]), rule, *map(fmt, lines[-totals:])]
        if self.dead:
            text.append(f"entirely zero ({len(self.dead)}): " + ", ".join(self.dead))
        return "\n".join(text)


def sparsity_summary(model):
    """Counts the zeros of `model`, pruned or stripped (or never pruned).

    Rows cover every prunable weight (as `prune()` finds them), as the forward
    pass sees it (`weight * mask` where masked). Returns a `SparsitySummary`.
    """
    effective, bookkeeping = _effective(model)
    masked = bool(effective)
    rows = []
    for weight in find_prunable(model).chosen:
        value = effective.get(id(weight.variable))
        pruned = value is not None if masked else None
        value = weight.variable.numpy() if value is None else value
        rows.append(KernelRow(weight.variable.path, weight.layer.name, weight.name,
                              tuple(value.shape), int(value.size), count_zeros(value), pruned))
    total_params = total_zeros = 0
    for weight in model.weights:
        if id(weight) in bookkeeping:
            continue
        value = effective.get(id(weight))
        value = weight.numpy() if value is None else value
        total_params += value.size
        total_zeros += count_zeros(value)
    return SparsitySummary(tuple(rows), total_params, total_zeros)


def _effective(model):
    """`({id(variable): weight * mask}, ids of the masks and flags)` of the pruned models in `model`."""
    effective, bookkeeping = {}, set()
    for pruned in pruned_models(model):
        bookkeeping.update(id(v) for v in [pruned.hard, *pruned.masks])
        for variable, mask in zip(pruned.targets, pruned.masks):
            effective[id(variable)] = variable.numpy() * mask.numpy()
    return effective, bookkeeping


@dataclasses.dataclass(frozen=True)
class PatternReport:
    """How a model's kernels hold an N:M `pattern`: the `checked` kernels (those
    with zeros) and their `blocks` of M, the `dense` ones (no zeros), and
    `broken`: `(path, blocks keeping more than N)`."""

    pattern: str
    checked: tuple
    blocks: int
    dense: tuple
    broken: tuple

    def __str__(self):
        lines = [f"{self.pattern}: {len(self.checked)} kernels hold zeros, {self.blocks:,} blocks checked, "
                 f"{len(self.broken)} kernels break the pattern"]
        lines += [f"  broken: {path} ({blocks} blocks)" for path, blocks in self.broken]
        if self.dense:
            lines.append(f"  dense ({len(self.dense)}): " + ", ".join(self.dense))
        return "\n".join(lines)

    def to_dict(self):
        return {"pattern": self.pattern, "kernels_checked": len(self.checked), "blocks": self.blocks,
                "dense": list(self.dense), "broken": [list(b) for b in self.broken]}


def pattern_report(model, pattern):
    """Checks the N:M `pattern` ('2:4') in every kernel of `model` that can hold
    one (`layer_kinds.pattern_axis`), as the forward
    pass sees it. Returns a `PatternReport`.

    Raises ValueError if `pattern` is not N:M.
    """
    found = settings.structure(pattern).pattern
    if found is None:
        raise ValueError(f"`pattern` must be N:M, such as '2:4'; got {pattern!r}.")
    n, m = found.n, found.m
    effective, _ = _effective(model)
    checked, dense, broken, blocks = [], [], [], 0
    for weight in find_prunable(model).chosen:
        axis, _ = layer_kinds.pattern_axis(weight, m)
        if axis is None:
            continue
        value = effective.get(id(weight.variable))
        value = weight.variable.numpy() if value is None else value
        if not count_zeros(value):
            dense.append(weight.variable.path)
            continue
        checked.append(weight.variable.path)
        blocks += value.size // m
        bad = nm_violations(value, axis, n, m)
        if bad:
            broken.append((weight.variable.path, bad))
    return PatternReport(f"{n}:{m}", tuple(checked), blocks, tuple(dense), tuple(broken))


def report_counts(pruned, stripped):
    """The sparsity figures of `run()`'s report for a pruned model and its stripped
    copy: one definition (`sparsity_summary`), the masks' share apart."""
    masked, plain = sparsity_summary(pruned), sparsity_summary(stripped)
    return {
        "sparsity_prunable": plain.prunable_sparsity,
        "sparsity_pruned": masked.pruned_sparsity,
        "sparsity_all_params": plain.total_sparsity,
        "params_prunable": plain.prunable_weights,
        "params_pruned": masked.pruned_weights,
        "params_dense_by_choice": masked.dense_by_choice,
        "params_total": plain.total_params,
        "params_nonzero": plain.total_params - plain.total_zeros,
        "entirely_zero": list(plain.dead),
    }
