"""The device mesh (axes data, fsdp, tensor, sequence) and the shardings of parameters and batches on it."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longctx.config import PARALLEL_AXES, mesh_shape
from longctx.parallel.rules import logical_to_spec


def make_mesh(parallel, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(parallel, len(devices))
  shape = tuple(sizes[a] for a in PARALLEL_AXES)
  try:
    return jax.make_mesh(shape, PARALLEL_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=devices)
  except (TypeError, AttributeError):
    return Mesh(np.asarray(devices).reshape(shape), PARALLEL_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(('batch', 'length'), mesh=mesh))


def param_specs(param_state: nnx.State, mesh: Mesh):
  """PartitionSpecs, as a pure dict shaped like `nnx.to_pure_dict(param_state)`, from each Param's logical axes."""
  variables = jax.tree.leaves(param_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  pure = nnx.to_pure_dict(param_state)
  treedef = jax.tree.structure(pure)
  specs = []
  for var, leaf in zip(variables, jax.tree.leaves(pure)):
    axes = var.get_metadata().get('logical_axes')
    if axes is None or len(axes) != leaf.ndim:
      raise ValueError(f'parameter of shape {leaf.shape} has logical axes {axes}; every Param needs one per dim')
    specs.append(logical_to_spec(axes, leaf.shape, mesh))
  return jax.tree.unflatten(treedef, specs)


def replication(abstract_params, param_shardings, mesh: Mesh) -> dict:
  """How much of the parameters every device holds whole: {'replicated_bytes', 'total_bytes', 'fraction',
  'largest': [(path, MiB), ...] the biggest fully replicated arrays}. Only meaningful when fsdp or tensor > 1."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  shardings = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  total = replicated = 0
  whole = []
  for (path, leaf), sharding in zip(leaves, shardings):
    size = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    total += size
    if all(axis is None for axis in sharding.spec):
      replicated += size
      whole.append((jax.tree_util.keystr(path), size / 2 ** 20))
  whole.sort(key=lambda x: -x[1])
  return {'replicated_bytes': replicated, 'total_bytes': total, 'fraction': replicated / max(total, 1),
          'largest': whole[:5]}
