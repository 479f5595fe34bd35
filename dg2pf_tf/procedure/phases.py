"""The phases of `run()` as data: Algorithm 2 of DG2PF, one row a phase.

1. gradual: distillation from the frozen dense teacher while the sparsity
   grows linearly (simulated pruning with weight recovery, AdamW + clipping;
   without the teacher when `distill_while_pruning` is False);
2. distill: the mask is final; distillation goes on until the validation
   score stops improving;
3. detached: the teacher is dropped, AdamW on cross-entropy until the next
   plateau;
4. finetune (only with `finetune=True`): pruned fine-tuning from the best
   state, cross-entropy, SGD with momentum, pruned weights exactly 0, until the
   validation score stops improving.
The best weights (and their masks) seen at the target sparsity win. The
runner (`runner.Procedure`) does what a row says and nothing by phase name.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Phase:
    """One row of the phase table: what a phase of `run()` does."""

    name: str
    epochs: int                   # at most this many
    optimizer: str                # a key of the run's optimizers: 'adamw' or 'sgd'
    teacher: bool                 # distils from the teacher
    updates_masks: bool = False   # the masks follow the schedule, inside the training step
    monitored: bool = True        # ends on a validation plateau; its epochs compete for the best state
    finalize_masks: bool = False  # afterwards the masks are final (from the latest weights) and hard
    after_plateau: bool = False   # runs only if the phase before it ended on a plateau
    from_best: bool = False       # starts from the best state so far


def phase_table(config):
    """The phases of a run with `config` (a resolved `RunConfig`), in order."""
    distill = config.alpha > 0
    table = [Phase("gradual", config.pruning_epochs, "adamw", teacher=distill and config.distill_while_pruning,
                   updates_masks=True, monitored=False, finalize_masks=True)]
    if distill:
        table.append(Phase("distill", config.max_epochs, "adamw", teacher=True))
    # After distillation that never plateaued there is nothing left for this one.
    table.append(Phase("detached", config.max_epochs, "adamw", teacher=False, after_plateau=distill))
    if config.finetune:
        table.append(Phase("finetune", config.max_epochs, "sgd", teacher=False, from_best=True))
    return tuple(table)
