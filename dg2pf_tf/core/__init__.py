"""Where masks go into a model and out again: finding prunable weights, the
masked model, its mask state and levels, schedules, the callback, zero counts."""
