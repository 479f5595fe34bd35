"""A latency budget checked on the model it selects: the shrunk model timed beside the dense one.

The latency model (`channels.latency`) adds up the timings of layers run
alone. Run together, a shrunk model's layers take a little more or less than
that sum says (what one layer leaves in the caches for the next, the work a
runtime overlaps): 1-3% on ResNet-50 here, up to 15% on MobileNetV2. So under
a latency budget `prune()` selects the channels for its target sparsity,
shrinks a copy to them (BatchNorm folded) and times it interleaved with the
dense model, in the budget's runtime; where the prediction is off by more
than `TOLERANCE` of the dense time, the latency model is fitted to every
measurement so far (`LatencyCosts.calibrated`) and selects again,
`ROUNDS` times at most; also where the shrunk model ran slower than asked by
more than half that. The timings are cached like the layers', keyed by the two
models, so a run resumed on the same machine selects alike.
"""

from dg2pf_tf.channels import latency
from dg2pf_tf.core.shrink import shrink
from dg2pf_tf.core.strip import strip

ROUNDS = 3
TOLERANCE = 0.01  # of the dense time
CHECK_SECONDS = 4.0  # the dense model's share of one check's timing: rounds of a fast model are cheap, and steadier


def _selected(pruned, criterion, level):
    """A plain copy of `pruned` with the channels `criterion` removes at `level` zeroed."""
    plain = strip(pruned)
    weights = plain.weights
    for i, mask in zip(pruned.target_indices, criterion.masks(None, level)):
        weights[i].assign(weights[i].numpy() * mask.numpy())
    return plain


def _close(share, predicted, level):
    """Whether a measured `share` agrees with the prediction, and is not slower than `level` asks."""
    return abs(share - predicted) <= TOLERANCE and share <= 1.0 - level + TOLERANCE / 2


def calibrated(pruned, criterion, level):
    """`criterion` (a `ChannelCriterion` under a latency budget) with its latency model
    fitted to the shrunk models it selects at `level`, measured; prints each check."""
    dense = shrink(strip(pruned), fold_batchnorm=True)
    base, measured = criterion.costs, []
    runs = int(min(31, max(7, CHECK_SECONDS / max(base.measured, 1e-9))))
    for _ in range(ROUNDS):
        costs = criterion.costs
        removed = ~criterion.keep(criterion.scores(), level).numpy()
        predicted = costs.cost_numpy(removed) / costs.total_cost
        small = shrink(_selected(pruned, criterion, level), fold_batchnorm=True)
        share = latency.measured_share(dense, small, costs.budget, runs)
        print(f"[dg2pf] latency of '{pruned.model.name}': the channels selected at {level:.1%} "
              f"predicted {predicted:.1%} of the dense time, measured {share:.1%}", flush=True)
        measured.append((removed, share))
        again = base.calibrated(measured)
        if _close(share, predicted, level) or again is base:
            break
        criterion = criterion.with_costs(again)
    return criterion
