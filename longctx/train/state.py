"""The train state (a plain pytree: step, params, opt_state, rng, and buffers when the model has any) and everything
derived from the config to build, shard and restore it.

Buffers are model variables outside the optimizer that the train step updates itself (routing centroids,
`longctx.layers.routing.Centroids`); they are checkpointed with the state. `RoutingStats` variables are scratch
space a forward pass writes, never stored."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding

from longctx import config as config_lib
from longctx import data
from longctx.layers.routing import Centroids, RoutingStats
from longctx.models.transformer import LanguageModel
from longctx.parallel import mesh as mesh_lib
from longctx.train import optimizer


class TrainSetup:
  """Model graph, optimizer, abstract state and its shardings for one config on one mesh."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    self.layer_names = abstract.layer_names
    if abstract.scan_layers:
      logging.info('model.scan_layers: %s', abstract.layer_plan().describe(len(self.layer_names)))
    self.uses_segments = data.rows_hold_several_documents(config)
    self.graphdef, abs_params, abs_buffers, abs_stats = nnx.split(abstract, nnx.Param, Centroids, RoutingStats)
    shape_of = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    self.abstract_buffers = jax.tree.map(shape_of, nnx.to_pure_dict(abs_buffers))
    self.abstract_stats = jax.tree.map(shape_of, nnx.to_pure_dict(abs_stats))
    self.has_buffers = bool(jax.tree.leaves(self.abstract_buffers))
    self.param_dtype = jnp.dtype(config.model.param_dtype)
    pure = nnx.to_pure_dict(abs_params)
    self.abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, self.param_dtype), pure)
    self.tx = optimizer.make(config.train, self.abstract_params)
    self.schedule = optimizer.schedule(config.train)
    specs = mesh_lib.param_specs(abs_params, mesh)
    self.param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    rep = mesh_lib.replicated(mesh)
    abs_opt = jax.eval_shape(self.tx.init, self.abstract_params)
    opt_shardings = optax_shardings(self.tx, abs_opt, self.param_shardings, rep)
    self.buffer_shardings = jax.tree.map(lambda _: rep, self.abstract_buffers)
    self.shardings = {'step': rep, 'params': self.param_shardings, 'opt_state': opt_shardings, 'rng': rep}
    abs_state = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': self.abstract_params,
                 'opt_state': abs_opt, 'rng': jax.ShapeDtypeStruct((2,), jnp.uint32)}
    if self.has_buffers:
      self.shardings['buffers'] = self.buffer_shardings
      abs_state['buffers'] = self.abstract_buffers
    self.weight_shardings = {'params': self.param_shardings, 'buffers': self.buffer_shardings}
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, self.shardings)

  def init(self, seed: int):
    """A fresh state, created directly in its shardings. Parameters are drawn on the host CPU where
    `train.init_on` says so (auto: under a GPU), then placed; the optimizer state is built on the devices."""
    key = jax.random.PRNGKey(seed)
    host = self.host_device()
    if host is None:
      return jax.jit(lambda key: self._assemble(*self._draw(key), key), out_shardings=self.shardings)(key)
    params, buffers = jax.device_get(jax.jit(self._draw)(jax.device_put(key, host)))
    placed = jax.device_put((params, buffers), (self.param_shardings, self.buffer_shardings))
    return jax.jit(self._assemble, out_shardings=self.shardings, donate_argnums=(0, 1))(*placed, key)

  def host_device(self):
    """The CPU device to draw parameters on, or None to draw them on the devices."""
    place = self.config.train.get('init_on', 'device')
    if place == 'device' or (place == 'auto' and jax.default_backend() != 'gpu'):
      return None
    try:
      return jax.local_devices(backend='cpu')[0]
    except RuntimeError:
      if place == 'host':
        raise config_lib.ConfigError('train.init_on', place, 'device or auto: this process has no CPU backend '
                                     '(JAX_PLATFORMS leaves it out)') from None
      logging.info('parameters drawn on the devices: no CPU backend in this process')
      return None

  def _draw(self, key):
    model = LanguageModel(self.config, rngs=nnx.Rngs(params=key))
    params = jax.tree.map(lambda x: x.astype(self.param_dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return params, (nnx.to_pure_dict(nnx.state(model, Centroids)) if self.has_buffers else {})

  def _assemble(self, params, buffers, key):
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': self.tx.init(params),
             'rng': jax.random.fold_in(key, 1)}
    if self.has_buffers:
      state['buffers'] = buffers
    return state

  def model(self, params, buffers=None):
    """The model holding `params` and `buffers` (required when the model has any), with fresh scratch stats."""
    if buffers is None:
      if self.has_buffers:
        raise ValueError('this model has buffers (routing centroids): pass them with the parameters')
      buffers = {}
    return nnx.merge(self.graphdef, params, buffers, self.zero_stats())

  def zero_stats(self):
    """`RoutingStats` as a forward pass starts them: zeros (a pure dict, {} without routing layers)."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.abstract_stats)

  def abstract_weights(self) -> dict:
    """Shapes and shardings of {'params', 'buffers'}."""
    return {'params': self.abstract_state['params'], 'buffers': self.abstract_state.get('buffers', {})}

  @staticmethod
  def weights(state) -> dict:
    """What a model needs from a train state: {'params', 'buffers'} (buffers {} when the model has none)."""
    return {'params': state['params'], 'buffers': state.get('buffers', {})}

  def seed_buffers(self, state, batch, seed: int):
    """The state with buffers seeded from a first batch (routing centroids by k-means); unchanged without buffers."""
    if not self.has_buffers:
      return state
    iterations = self.config.model.routing.kmeans_iterations

    def seeded(params, buffers, batch):
      model = self.model(params, buffers)
      segment_ids = batch['segment_ids'] if self.uses_segments else None
      model.seed_routing(batch['tokens'], batch['positions'], segment_ids, seed, iterations)
      return nnx.to_pure_dict(nnx.state(model, Centroids))

    buffers = jax.jit(seeded, out_shardings=self.buffer_shardings)(state['params'], state['buffers'], batch)
    return {**state, 'buffers': buffers}

  def param_count(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params))

  def matmul_param_count(self) -> int:
    """Parameters that take part in a matmul per token: all matrices but the embedding lookup, plus the tied head."""
    m = self.config.model
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params) if len(x.shape) >= 2)
    return total - m.vocab_size * m.d_model + (m.vocab_size * m.d_model if m.tie_embeddings else 0)


def optax_shardings(tx, abstract_opt_state, param_shardings, replicated):
  """Optimizer-state shardings: moments follow their parameters, everything else (counts) is replicated."""
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_shardings,
                               transform_non_params=lambda _: replicated)
