"""Repeated layers: created by one vmap, and run as a `lax.scan` over their groups (`model.scan_layers`).

A 24-layer stack unrolled is 24 copies of the block in the compiled program; scanned over 6 repeats of a 4-layer
group it is one copy, so compile time stops growing with depth. The parameters keep their per-layer layout (one
pytree per block, as unrolled): the scan stacks each group position's weights on the fly, so checkpoints, shardings
and the optimizer are the same either way and a run may switch between the two.

Layers repeat when their blocks have the same graph (mixer kind and static attributes) and the same kind of
forget-gate bound; `plan` finds the longest run of repeats and the layers before and after it run unrolled.
`build` creates that run's blocks with one `jax.vmap` over their keys whether or not they are scanned, so the
initialiser of a deep stack compiles one copy of each repeated block too.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.parallel.rules import constrain


@dataclasses.dataclass(frozen=True)
class Plan:
  """Layers [start, start + period * repeats) run as `repeats` scan steps of `period` layers; the rest unrolled.
  `repeats` 0: no scan."""
  start: int
  period: int
  repeats: int

  @property
  def stop(self) -> int:
    return self.start + self.period * self.repeats

  def describe(self, num_layers: int) -> str:
    if not self.repeats:
      return f'all {num_layers} layers unrolled (no group of layers repeats)'
    text = f'layers {self.start}-{self.stop - 1} scanned as {self.repeats} repeats of {self.period}'
    rest = num_layers - self.period * self.repeats
    return text + (f', {rest} unrolled' if rest else '')


UNROLLED = Plan(0, 1, 0)


def plan(keys: Sequence[Hashable]) -> Plan:
  """The scan covering the most layers: a start and a period such that `repeats` >= 2 consecutive groups of
  `period` layers have equal keys; ties go to the shorter period (a smaller scan body), then the earlier start."""
  n = len(keys)
  best = UNROLLED
  for period in range(1, n // 2 + 1):
    for start in range(0, n - 2 * period + 1):
      repeats = 1
      while (start + (repeats + 1) * period <= n
             and keys[start + repeats * period: start + (repeats + 1) * period] == keys[start: start + period]):
        repeats += 1
      if repeats >= 2 and period * repeats > best.period * best.repeats:
        best = Plan(start, period, repeats)
  return best


def block_key(block: nnx.Module) -> tuple:
  """What two layers must share to be repeats: the graph (module kinds, static attributes) and the parameter
  shapes."""
  graphdef, state = nnx.split(block)
  return graphdef, tuple((x.shape, x.dtype) for x in jax.tree.leaves(state))


def build(make: Callable[[int, nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> list[nnx.Module]:
  """`make(i, rngs)` for every layer, the longest run of repeated layers (`plan`) created by one `jax.vmap` over
  their keys: initialising a deep stack then compiles one copy of each repeated block's initialiser instead of one
  per layer (on a GPU, minutes for a 24-layer 340M model otherwise)."""
  abstract = [nnx.eval_shape(lambda i=i: make(i, nnx.Rngs(0))) for i in range(num_layers)]
  plan_ = plan([block_key(a) for a in abstract])
  blocks = [None] * num_layers
  for i in [*range(plan_.start), *range(plan_.stop, num_layers)]:
    blocks[i] = make(i, rngs)
  for j in range(plan_.period if plan_.repeats else 0):
    layers = [plan_.start + g * plan_.period + j for g in range(plan_.repeats)]
    graphdef = nnx.graphdef(abstract[layers[0]])
    states = jax.vmap(lambda key: nnx.state(make(layers[0], nnx.Rngs(params=key))))(
        jax.random.split(rngs.params(), len(layers)))
    for g, i in enumerate(layers):
      blocks[i] = nnx.merge(graphdef, _index(states, g))
  return blocks


def _variables(fn, *states):
  return jax.tree.map(fn, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _stack(states: Sequence[nnx.State]) -> nnx.State:
  """One state with a leading layer axis; each parameter constrained to its own sharding under that axis."""
  def stack(*variables):
    value = jnp.stack([v[...] for v in variables])
    axes = getattr(variables[0], 'logical_axes', None)
    return variables[0].replace(value if axes is None else constrain(value, ('layers',) + tuple(axes)))
  return _variables(stack, *states)


def _index(state: nnx.State, i: int) -> nnx.State:
  return _variables(lambda v: v.replace(v[...][i]), state)


def run(blocks: Sequence[nnx.Module], bounds: Sequence, x, plan_: Plan,
        apply: Callable[[nnx.Module, jax.Array, object], jax.Array], *, remat: bool = False, policy=None):
  """x through `blocks`: `apply(block, x, bound)` for each, the layers of `plan_` as one scan.

  With `remat` each block's application is rematerialised (`jax.checkpoint` with `policy`) in the backward pass.
  State other than the parameters that a block writes while it runs (routing statistics) is carried out of the scan
  and written back."""
  def call(block, x, bound, in_scan=False):
    if not remat:
      return apply(block, x, bound)
    # Inside a scan the loop already keeps XLA from merging the recomputation into the forward pass.
    checkpoint = functools.partial(jax.checkpoint, policy=policy, prevent_cse=not in_scan)
    graphdef, state = nnx.split(block)
    def pure(state, x, bound):
      block = nnx.merge(graphdef, state)
      y = apply(block, x, bound)
      return y, nnx.state(block, nnx.Not(nnx.Param))
    y, rest = checkpoint(pure)(state, x, bound)
    nnx.update(block, rest)
    return y

  for i in range(plan_.start):
    x = call(blocks[i], x, bounds[i])
  if plan_.repeats:
    p, r, s = plan_.period, plan_.repeats, plan_.start
    graphdefs, stacked, stacked_bounds = [], [], []
    for j in range(p):
      members = [blocks[s + g * p + j] for g in range(r)]
      splits = [nnx.split(b) for b in members]
      graphdefs.append(splits[0][0])
      stacked.append(_stack([state for _, state in splits]))
      member_bounds = [bounds[s + g * p + j] for g in range(r)]
      stacked_bounds.append(None if member_bounds[0] is None else jnp.stack(member_bounds))

    def body(x, xs):
      states, group_bounds = xs
      written = []
      for graphdef, state, bound in zip(graphdefs, states, group_bounds):
        block = nnx.merge(graphdef, state)
        x = call(block, x, bound, in_scan=True)
        written.append(nnx.state(block, nnx.Not(nnx.Param)))
      return x, written

    x, written = jax.lax.scan(body, x, (stacked, stacked_bounds))
    for j in range(p):
      for g in range(r):
        nnx.update(blocks[s + g * p + j], _index(written[j], g))
  for i in range(plan_.stop, len(blocks)):
    x = call(blocks[i], x, bounds[i])
  return x
