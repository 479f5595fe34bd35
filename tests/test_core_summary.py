import json

import numpy as np

import dg2pf_tf
from helpers import mlp


def test_summary_counts_effective_zeros_per_kernel_and_over_all_parameters():
    pruned = dg2pf_tf.prune(mlp())
    dg2pf_tf.update_masks(pruned, 0.5)
    summary = dg2pf_tf.sparsity_summary(pruned)
    assert [(r.layer, r.kernel, r.shape, r.pruned) for r in summary.rows] == [
        ("hidden", "kernel", (16, 32), True), ("out", "kernel", (32, 4), True)
    ]
    assert summary.prunable_weights == 16 * 32 + 32 * 4
    assert summary.prunable_zeros == 320
    # All parameters: kernels and biases (zero-initialised), masks excluded.
    assert summary.total_params == 640 + 32 + 4
    assert summary.total_zeros == 320 + 36
    assert np.isclose(summary.total_sparsity, 356 / 676)
    json.dumps(summary.to_dict())


def test_summary_prints_a_table_with_both_totals():
    pruned = dg2pf_tf.prune(mlp())
    dg2pf_tf.update_masks(pruned, 0.75)
    text = str(dg2pf_tf.sparsity_summary(pruned))
    assert "hidden/kernel" in text and "16x32" in text and "pruned" in text
    assert "prunable weights" in text and "75.00%" in text
    assert "all parameters" in text


def test_summary_of_a_dense_model_counts_its_prunable_kernels():
    summary = dg2pf_tf.sparsity_summary(mlp())
    assert summary.prunable_weights == 640 and summary.prunable_zeros == 0
    assert summary.pruned_weights == 0 and all(r.pruned is None for r in summary.rows)
