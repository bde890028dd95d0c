"""Benchmarks that measure fastdqn against its peers, side by side in one run."""
