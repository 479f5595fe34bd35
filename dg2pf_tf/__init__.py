"""dg2pf_tf: DG2PF pruning (Distilled Gradual Pruning with Pruned Fine-tuning) for Keras 3.

Public API (everything else is internal):
    prune, strip, finalize       rebuild a model with / without pruning masks
    PrunedModel                  what prune() returns: a model read through masks
    UpdateMasks                  the `fit` callback that applies a schedule
    update_masks                 set a sparsity level by hand (custom loops)
    sparsity_summary             per-layer and total zero counts
    pattern_report               which kernels hold an N:M pattern (structure='2:4')
    schedules                    Linear, Polynomial, Constant
    Distiller                    KD training of a student on a frozen teacher
    run, RunConfig, RunResult    the whole DG2PF procedure on a trained model
    reestimate_batchnorm         refresh BatchNorm statistics after pruning
    evaluate                     a model's validation metric and loss, for its task
    tasks                        Categorical, Binary, Regression: what outputs mean
    export                       SavedModel + sparse LiteRT files, checked
    deploy_report                can XNNPACK run this model sparse, per operator
    presets                      which layers to prune for an engine (xnnpack)
    channel_groups               coupled channel groups of a model (structure='channel')
    shrink                       a channel-pruned model rebuilt with fewer channels
    Unstructured, Channels, NM   what masks remove (`structure=`; or 'unstructured', 'channel', '2:4')
    ChannelCount, MACs, Params   what a channel level counts (`budget=`; or 'channels', 'macs', 'params')
    Latency                      ... or the latency measured in Keras or LiteRT (or 'latency')

Layout, from the bottom up (each layer imports only those below it):
`_compat`, `checks`, `settings`, `counting`, `atomic`; `model` (layer kinds,
the walk, the copy); `criteria` (what goes at a level); `channels` (coupled
groups and their costs); `core` (masks into a model and out, the smaller
model); `procedure` (run() and its phases); `deploy` (what ships).
"""

from dg2pf_tf.channels.graph import ChannelStructure, channel_groups
from dg2pf_tf.core import schedules
from dg2pf_tf.core.callbacks import UpdateMasks
from dg2pf_tf.core.masking import update_masks
from dg2pf_tf.core.prune import finalize, prune
from dg2pf_tf.core.pruned_model import PrunedModel
from dg2pf_tf.core.shrink import shrink
from dg2pf_tf.core.strip import strip
from dg2pf_tf.core.summary import PatternReport, SparsitySummary, pattern_report, sparsity_summary
from dg2pf_tf.deploy import presets
from dg2pf_tf.deploy.export import export
from dg2pf_tf.deploy.xnnpack import DeployReport, deploy_report
from dg2pf_tf.procedure import tasks
from dg2pf_tf.procedure.batchnorm import reestimate_batchnorm
from dg2pf_tf.procedure.config import RunConfig
from dg2pf_tf.procedure.distill import Distiller
from dg2pf_tf.procedure.evaluation import evaluate
from dg2pf_tf.procedure.report import RunResult
from dg2pf_tf.procedure.run import run
from dg2pf_tf.settings import NM, ChannelCount, Channels, Latency, MACs, Params, Unstructured

__version__ = "0.1.0"


__all__ = [
    "ChannelCount",
    "ChannelStructure",
    "Channels",
    "DeployReport",
    "Distiller",
    "Latency",
    "MACs",
    "NM",
    "Params",
    "PatternReport",
    "PrunedModel",
    "RunConfig",
    "RunResult",
    "SparsitySummary",
    "Unstructured",
    "UpdateMasks",
    "channel_groups",
    "deploy_report",
    "evaluate",
    "export",
    "finalize",
    "pattern_report",
    "presets",
    "prune",
    "reestimate_batchnorm",
    "run",
    "schedules",
    "shrink",
    "sparsity_summary",
    "strip",
    "tasks",
    "update_masks",
]
