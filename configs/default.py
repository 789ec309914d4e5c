"""Dense decoder-only Transformer on byte-level text.

Variants: `configs/default.py:size=tiny|125m|350m`. `tiny` (the default) trains on a laptop CPU in a few minutes
on the Python standard library's sources, which every machine has.
"""
import ml_collections

from longctx.config import parse_variant

SIZES = {
    #        layers d_model heads kv_heads mlp   vocab  seq_len batch steps  lr
    'tiny': (2, 128, 4, 2, 384, 384, 256, 16, 300, 3e-3),
    '125m': (12, 768, 12, 12, 2048, 32768, 2048, 32, 20000, 6e-4),
    '350m': (24, 1024, 16, 16, 2816, 32768, 2048, 32, 20000, 3e-4),
}


def get_config(arg=None):
  variant = parse_variant(arg, size='tiny')
  if variant.size not in SIZES:
    from longctx.config import ConfigError
    raise ConfigError('--config variant size', variant.size, f'one of {", ".join(SIZES)}')
  layers, d_model, heads, kv_heads, mlp, vocab, seq_len, batch, steps, lr = SIZES[variant.size]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ''

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = layers
  c.model.d_model = d_model
  c.model.num_heads = heads
  c.model.num_kv_heads = kv_heads
  c.model.head_dim = 0                # 0: d_model // num_heads
  c.model.mlp_dim = mlp
  c.model.vocab_size = vocab
  c.model.pattern = 'attention'       # a mixer for every layer, a comma-separated list per layer, or 'hybrid'
  c.model.tie_embeddings = True
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-6
  c.model.dtype = 'float32' if variant.size == 'tiny' else 'bfloat16'   # compute dtype
  c.model.param_dtype = 'float32'     # parameters and optimizer state
  c.model.remat = 'none'              # none | full | dots_saveable | offload_dots (saved matmuls in host memory)
  c.model.scan_layers = False         # repeated groups of layers as one lax.scan: compile time flat in depth
  c.model.loss_chunks = 1             # >1: the loss in this many strided groups of tokens, never all logits at once
  c.model.attention = ml_collections.ConfigDict()
  c.model.attention.impl = 'auto'     # auto | cudnn | xla | chunked | naive
  c.model.attention.window = 0        # 0: full causal; w > 0: each token sees itself and w - 1 before it
  c.model.attention.chunk_size = 256
  c.model.attention.max_segments = 64 # packed rows with more documents than this skip cuDNN for the chunked path

  c.model.attention.persistent_tokens = 0  # learned tokens every query sees (Titans' persistent memory: 128)
  c.model.attention.conv_size = 0     # short causal convolution of q, k, v over K tokens (0: none; Zoology's MQAR: 4)
  c.model.attention.swa_window = 2048 # window of the 'swa' mixer (sliding-window attention layers in hybrids)
  c.model.hybrid = ml_collections.ConfigDict()   # the rule behind model.pattern = 'hybrid'
  c.model.hybrid.linear = 'gated_deltanet'
  c.model.hybrid.ratio = '3:1'        # r:1 = groups of r linear layers and one attention layer; 1:0 = no attention
  c.model.hybrid.placement = 'last'   # last | first | middle | comma-separated attention layer indices
  c.model.hybrid.attention = 'attention'   # attention | swa
  c.model.linear = ml_collections.ConfigDict()   # linear-attention mixers (longctx.layers.linear)
  c.model.linear.num_heads = 0        # 0: model.num_heads
  c.model.linear.head_dim = 0         # 0: the attention head dim
  c.model.linear.expand_v = 1         # value head dim = head_dim * expand_v
  c.model.linear.conv_size = 4
  c.model.linear.chunk_size = 64
  c.model.linear.kernel = 'auto'      # the chunk state pass: auto (Pallas on GPU where it applies) | pallas | jax
  c.model.routing = ml_collections.ConfigDict()  # Routing Transformer layers (longctx.layers.routing)
  c.model.routing.heads = 2           # routing heads per 'routing' layer; the others are local
  c.model.routing.num_clusters = 4    # K centroids per routing head
  c.model.routing.window = 0          # w tokens per cluster (0: data.seq_len / num_clusters)
  c.model.routing.local_block = 64    # local heads: causal attention over this block and the one before
  c.model.routing.causal = False      # False: balanced top-w clusters (paper); True: prefix-only, as decoding
  c.model.routing.ema_decay = 0.999
  c.model.routing.ema_eps = 1e-5
  c.model.routing.commitment = 1e-4   # weight of the commitment loss ‖LN(q) − sg(μ)‖²
  c.model.routing.kmeans_iterations = 3   # Lloyd steps seeding the centroids from the first batch
  c.model.titans = ml_collections.ConfigDict()   # Titans' neural memory (longctx.layers.titans)
  c.model.titans.num_heads = 0        # 0: model.num_heads
  c.model.titans.head_dim = 0         # 0: the attention head dim (keys, values and queries alike)
  c.model.titans.memory_depth = 2     # layers of the memory MLP; 1 = a linear memory
  c.model.titans.memory_expansion = 4 # hidden width of the memory MLP = head_dim * expansion
  c.model.titans.activation = 'gelu'  # gelu | silu | relu
  c.model.titans.chunk_size = 16      # tokens per step of the sequential scan (one state kept per chunk for backward)
  c.model.titans.anchor_batch = 0     # tokens whose gradients share one memory state (the paper's b); 0 = chunk_size
  c.model.titans.gate_granularity = 'token'  # token | chunk (gates held at each anchor batch's first token)
  c.model.titans.forget_gate = 'head' # head | channel (α per head, or per channel of the memory)
  c.model.titans.kernel = 'auto'      # the memory pass: auto (= jax today) | pallas (GPU or TPU kernel) | jax
  c.model.titans.max_lr = 0.1         # θ = max_lr · σ(W_θ x): the inner learning rate's bound
  c.model.titans.grad_clip = 1.0      # per-token inner-gradient norm bound (0: none)
  c.model.titans.conv_size = 4
  c.model.titans.segment_size = 512   # MAC: tokens per attention segment (the paper's C)
  c.model.titans.objective = 'l2'     # Miras attentional bias: l2 | lp | huber (per-token δ)
  c.model.titans.p = 3.0              # exponent of the lp objective
  c.model.titans.retention = 'l2'     # Miras retention at chunk ends: l2 (decay only) | lq | elastic_net
  c.model.titans.q = 4.0              # exponent of the lq retention
  c.model.titans.l1 = 0.0             # soft threshold of the elastic-net retention

  c.data = ml_collections.ConfigDict()
  c.data.source = 'stdlib'            # stdlib | text | tokens | a synthetic task name
  c.data.path = ''                    # glob of text files (text) or token files (tokens)
  c.data.seq_len = seq_len
  c.data.val_percent = 2.0            # share of files (text) or windows (tokens) held out for validation
  c.data.token_dtype = 'uint16'       # raw .bin token files
  c.data.eos_id = -1                  # token files: document separator (-1: none)
  c.data.mqar = ml_collections.ConfigDict(   # source 'mqar' (Zoology's multi-query associative recall)
      {'vocab': 8192, 'num_pairs': 16, 'power_a': 0.01, 'random_non_queries': False})
  c.data.niah_fraction = 0.0          # text sources: share of training rows turned into S-NIAH needle rows
  c.data.niah_scored = 'text'         # text | answer: needle rows scored as text or only at the value's digits
  c.data.num_threads = 4
  c.data.prefetch = 8

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = steps
  c.train.batch_size = batch
  c.train.grad_accum = 1
  c.train.init_on = 'auto'            # auto | host | device: where parameters are drawn (auto: host CPU under a GPU,
                                      # whose compiler takes minutes over a deep stack's initialiser)
  c.train.learning_rate = lr
  c.train.schedule = 'cosine'         # cosine | linear | constant, after linear warmup
  c.train.warmup_steps = c.train.get_ref('num_steps') // 10   # follows num_steps overrides
  c.train.min_lr_ratio = 0.1
  c.train.optimizer = 'adamw'         # adamw | adam | lion | sgd
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.weight_decay = 0.1
  c.train.decay_embeddings = False    # weight decay on embeddings (norm scales are never decayed)
  c.train.clip_norm = 1.0             # global gradient-norm clip; 0 disables
  c.train.z_loss = 0.0                # weight of log(Z)^2 (PaLM)
  c.train.nan_policy = 'halt'         # halt | skip a step whose loss or gradients are not finite
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.train.checkpoint_every = 100
  c.train.keep = 3                    # keep the newest K checkpoints ...
  c.train.keep_every = 0              # ... and every M-th step besides (0: none)
  c.train.stop_after = 0              # stop (with a checkpoint) after this many steps of this run, as a preemption would
  c.train.profile_steps = ''          # 'first,last' steps to trace with jax.profiler into WORKDIR/profile
  c.train.progress_bar = True

  c.parallel = ml_collections.ConfigDict()
  c.parallel.data = -1                # -1: every device not used by the other axes
  c.parallel.fsdp = 1
  c.parallel.tensor = 1
  c.parallel.sequence = 1
  c.parallel.context = 'ring'         # attention over a sharded sequence: ring | all_gather
  c.parallel.max_replicated = 0.05    # with fsdp or tensor > 1: most of the parameter bytes left whole on every device
  c.parallel.load_balance = 'zigzag'  # token order of a row split over the sequence axis: zigzag | striped | none
  c.parallel.balance_attention = False  # load_balance none: full attention runs in zigzag order (faster, more memory)
  return c
