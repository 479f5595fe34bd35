"""What every layer above shares about a Keras model: its layer kinds, the walk that finds
prunable weights, and the one way to copy it."""
