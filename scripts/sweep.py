"""Run a sweep of configs: see longctx/cli/sweep.py."""
from longctx.cli.sweep import run

if __name__ == '__main__':
  run()
