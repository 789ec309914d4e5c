"""Shared checks for sequence mixers."""
import numpy as np
from flax import nnx


def prefill_then_decode(mixer, x, pos, prompt):
  """The mixer's outputs from a cached call over the first `prompt` tokens followed by one-token cached calls,
  jitted, concatenated over time: what must equal the full forward."""
  call = nnx.jit(lambda m, x, p, c: m(x, positions=p, segment_ids=None, cache=c))
  out, cache = call(mixer, x[:, :prompt], pos[:, :prompt], mixer.init_cache(x.shape[0], x.shape[1]))
  outs = [out]
  for t in range(prompt, x.shape[1]):
    o, cache = call(mixer, x[:, t:t + 1], pos[:, t:t + 1], cache)
    outs.append(o)
  return np.concatenate(outs, axis=1)
