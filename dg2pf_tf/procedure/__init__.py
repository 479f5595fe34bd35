"""The DG2PF procedure: `run()`, its phases, the distributed epoch loop, the
distiller, tasks, data, evaluation and resumable checkpoints."""
