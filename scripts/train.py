"""Train a config: see longctx/cli/train.py."""
from longctx.cli.train import run

if __name__ == '__main__':
  run()
