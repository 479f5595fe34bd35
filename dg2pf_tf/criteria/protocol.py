"""`Criterion`: what every mask criterion offers the mask state (`core.masking.MaskSet`).

Three implement it: `magnitude.DeviceCriterion` (single weights),
`nm.NMCriterion` (N:M patterns) and `channel.ChannelCriterion` (whole
channels, by count or by cost). Each computes masks in TensorFlow ops equal to
its numpy reference in `reference`, and checks numpy masks against a level.
"""

import typing


@typing.runtime_checkable
class Criterion(typing.Protocol):
    """Masks at a sparsity level, on the device, and what a level means.

    Attributes:
        unit: what the level is a share of ('weights', 'channels', 'MACs', 'parameters').
        total: how many weights or channels the masks cover.
        max_level: the highest level the masks can reach.
    """

    unit: str
    total: int
    max_level: float

    def describe(self):
        """What the masks remove, in words ('56,224 weights in 4 kernels', '1,184 channels in 9 groups')."""

    def unreachable(self, level):
        """Why `level` cannot be reached (a sentence that says the most that can go), or None."""

    def report(self, masks):
        """Entries of `run()`'s report (JSON-serialisable) for numpy `masks`, beyond the
        zero counts every structure reports: channels removed, the share of a cost."""

    def masks(self, values, level):
        """Float32 masks of the pruned weights at `level` (a float64 scalar tensor),
        from their current `values`, in TensorFlow ops (inside compiled code)."""

    def removals(self, level):
        """How many units `level` removes, exactly, or None where that depends on the weights."""

    def realised(self, level):
        """The share the masks remove at `level`, from the shapes alone."""

    def removed(self, masks):
        """How many weights or channels numpy `masks` remove."""

    def problem(self, masks, level, names):
        """Why numpy `masks` (of the weights called `names`) are not what this criterion
        makes at `level`, or None."""
