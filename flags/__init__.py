"""absl flag definitions for train.py."""
