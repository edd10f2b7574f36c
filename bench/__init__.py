"""Benchmarks: GPU speed and memory, reported as ratios to baselines measured in the same run."""
