"""Models and data sets for train.py and the benchmarks (not part of dg2pf_tf's API)."""
