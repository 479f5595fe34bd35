"""Fixtures for every test: a fresh Keras state, small inputs. Shared helpers live in `helpers`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.utils.set_random_seed(0)
    yield
    # Without the full gc.collect() per test: it costs seconds once TensorFlow
    # holds many graphs (Keras' optimizer all_reduce registers a gradient per
    # trace, so they stay), and Python's own collector frees the rest anyway.
    keras.backend.clear_session(free_memory=False)
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 32)
