"""Whole channels: the coupled groups read from a Keras graph, what they cost,
and the smaller model once they are gone."""
