"""A finished (or running) run, loaded for evaluation or sampling: its saved config and newest weights (parameters
and buffers)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from longctx import config as config_lib


@dataclasses.dataclass
class Run:
  workdir: str
  config: Any
  setup: Any          # longctx.train.state.TrainSetup
  weights: Any        # {'params', 'buffers'}

  def model(self):
    return self.setup.model(self.weights['params'], self.weights['buffers'])


def load_config(workdir: str, overrides: dict | None = None):
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise config_lib.ConfigError('--workdir', workdir, 'a run directory holding config.json (made by longctx-train)')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  return config_lib.override(config, overrides or {})


def load(workdir: str, overrides: dict | None = None, weights=None) -> Run:
  """The run's config (with dotted `overrides`, e.g. another data.seq_len), validated, and its newest weights
  (or `weights` already in memory, laid out for the same config)."""
  from longctx.parallel.mesh import make_mesh
  from longctx.train.checkpoint import restore_weights
  from longctx.train.state import TrainSetup

  config = load_config(workdir, overrides)
  config_lib.validate(config, jax.device_count())
  setup = TrainSetup(config, make_mesh(config.parallel))
  if weights is None:
    weights = restore_weights(os.path.join(workdir, 'checkpoints'), setup.abstract_weights())
  return Run(workdir, config, setup, weights)
