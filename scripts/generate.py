"""Sample from a run's newest checkpoint: see longctx/cli/generate.py."""
from longctx.cli.generate import run

if __name__ == '__main__':
  run()
