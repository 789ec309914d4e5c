"""Evaluate a run's newest checkpoint: see longctx/cli/evaluate.py."""
from longctx.cli.evaluate import run

if __name__ == '__main__':
  run()
