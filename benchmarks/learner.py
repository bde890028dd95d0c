"""Learner update benchmark, eager vs CUDA graph; see fastdqn/bench/learner.py (`--help`)."""
from fastdqn.bench.learner import main

if __name__ == "__main__":
    main()
