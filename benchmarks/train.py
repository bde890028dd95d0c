"""End-to-end training benchmark against SB3; see fastdqn/bench/train.py (`--help`)."""
from fastdqn.bench.train import main

if __name__ == "__main__":  # each run spawns a process that imports this file
    main()
