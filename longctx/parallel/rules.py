"""Logical axis names -> mesh axes: the one table that decides how parameters and activations are laid out.

Parameters carry logical names in their `logical_axes` metadata; activations are constrained with `constrain`.
Changing the parallelism is a change of mesh sizes (config), never of this table or the model code.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

# (logical name, mesh axes it is sharded over). Parameter names first, then activation names.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('embed', ('fsdp',)),
    ('vocab', ('tensor',)),
    ('heads', ('tensor',)),
    ('kv_heads', ('tensor',)),
    ('mlp', ('tensor',)),
    ('head_dim', ()),
    ('norm', ()),
    ('layers', ()),
    ('batch', ('data', 'fsdp')),
    ('length', ('sequence',)),
    ('act_embed', ()),
    ('act_heads', ('tensor',)),
    ('act_kv_heads', ('tensor',)),
    ('act_mlp', ('tensor',)),
    ('act_vocab', ('tensor',)),
)

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar('longctx_mesh', default=None)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None,
                    rules=RULES) -> PartitionSpec:
  """PartitionSpec for an array with these logical axis names.

  A dimension that the mesh axes do not divide stays replicated rather than failing: sharding is a layout choice
  and must never change what a config computes.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f'logical axis {name!r} has no rule; known: {sorted(table)}')
    axes = tuple(a for a in table[name] if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
    if mesh is not None and shape is not None and axes:
      size = 1
      for a in axes:
        size *= mesh.shape[a]
      if shape[i] % size:
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh | None):
  """Within this context `constrain` pins activations to `mesh`; outside it `constrain` does nothing."""
  token = _CONTEXT.set(mesh)
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def sequence_mesh() -> jax.sharding.Mesh | None:
  """The enclosing mesh when it shards the sequence (a `sequence` axis larger than 1), else None: whether a mixer
  takes its context-parallel path."""
  mesh = _CONTEXT.get()
  return mesh if mesh is not None and mesh.shape.get('sequence', 1) > 1 else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  mesh = _CONTEXT.get()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))
