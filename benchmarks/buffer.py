"""Replay-buffer benchmark against SB3, cpprb and TorchRL; see fastdqn/bench/buffer.py (`--help`)."""
from fastdqn.bench.buffer import main
if __name__ == "__main__": raise SystemExit(main())  # noqa: E701
