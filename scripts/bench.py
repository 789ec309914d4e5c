"""Benchmark training steps: see longctx/cli/bench.py."""
from longctx.cli.bench import run

if __name__ == '__main__':
  run()
