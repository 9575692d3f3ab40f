"""Shared base for every training recipe: the Inst-IT continuous-SFT defaults.

A recipe file imports `get_base_config()`, overrides the few fields that differ (model size, learning
rate, data sources) and returns the config from its own `get_config()`. The base ConfigDict is
locked, so a misspelt field in a recipe or on the command line (`--config.optim.lrr=1`) fails at once.
Only ml_collections and the model config dataclasses (`instit_jax.models.config`, the one schema of
`model.vision` / `model.text`) are imported here; `instit_jax.train.config` turns the `model` section into
a `LlavaConfig` and a `ComputeConfig` and validates combinations.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from instit_jax.models.config import TextConfig, VisionConfig

# CLIP ViT-L/14-336 (the Vicuna and ablation recipes).
CLIP_L_336 = dict(
    model_type="clip", image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
    num_hidden_layers=24, num_attention_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu",
)
# SigLIP-SO400M-patch14-384 with the final block removed, as the reference does (26 of 27 blocks kept).
SIGLIP_SO400M_384 = dict(
    model_type="siglip", image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
    num_hidden_layers=26, num_attention_heads=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
)


def _section(cls: type, fields: dict) -> ml_collections.ConfigDict:
    """`cls`'s fields with their defaults (documented in instit_jax/models/config.py), updated by `fields`;
    None defaults become 0 (ml_collections fields keep one type; `llava_config` maps 0 back to None)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {unknown}; fields: {names}")
    d = {f.name: 0 if f.default is None else f.default for f in dataclasses.fields(cls)}
    d.update(fields)
    return ml_collections.ConfigDict(d)


def vision_section(**fields) -> ml_collections.ConfigDict:
    """A `model.vision` section: `VisionConfig`'s fields and defaults (CLIP ViT-L/14-336), updated by `fields`."""
    return _section(VisionConfig, fields)


def text_section(**fields) -> ml_collections.ConfigDict:
    """A `model.text` section: `TextConfig`'s fields and defaults (Vicuna-7B; head_dim 0 -> hidden_size //
    num_attention_heads), updated by `fields`."""
    return _section(TextConfig, fields)


def get_base_config() -> ml_collections.ConfigDict:
    """The common Inst-IT continuous-SFT recipe (Vicuna-7B shaped model; recipes override)."""
    c = ml_collections.ConfigDict()
    c.name = "base"  # run name, written into metrics and the saved config
    c.seed = 0  # seed for parameter init (random init only) and data order

    # ---------------- model: converts 1:1 into instit_jax.models.config.LlavaConfig ----------------
    c.model = ml_collections.ConfigDict()
    c.model.vision = vision_section(**CLIP_L_336)  # vision tower
    c.model.text = text_section()  # language model
    c.model.image_token_id = 32000  # id of the <image> placeholder token
    c.model.video_token_id = -1  # id of a separate <video> token; -1 -> same as image_token_id
    c.model.projector_hidden_act = "gelu"  # mlp2x_gelu projector activation
    c.model.vision_feature_layer = -2  # hidden state fed to the projector (-2 = penultimate, CLIP)
    c.model.vision_feature_select_strategy = "default"  # "default" drops CLS, "full" keeps it
    c.model.image_aspect_ratio = "anyres"  # "anyres" tiles + base view, "anyres_max_9", or "single"
    # Grid pinpoints (W, H) for anyres; the Vicuna list.
    c.model.image_grid_pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    c.model.use_image_newline = True  # append image_newline after every row of the tile grid
    c.model.video_pooling = "bilinear"  # 2x2 spatial pooling of video frame tokens
    c.model.video_pool_stride = 2  # pooling stride (24x24 -> 12x12 for CLIP)
    c.model.video_newline = "no_token"  # newline placement for video tokens
    # Decoder attention for training steps: "xla" (materialises [T, T] scores per head), "cudnn" (GPU flash,
    # right padding), "blockwise" (pure-JAX flash attention, O(T) memory: the TPU choice at 6K tokens).
    c.model.attention_impl = "xla"
    c.model.attention_block_size = 512  # query/key block of the blockwise attention (multiple of 8)
    c.model.dtype = "bfloat16"  # compute dtype of activations
    c.model.param_dtype = "float32"  # master weights stay f32
    # Operand dtype of every Linear's products, accumulated in model.dtype: "" = model.dtype; "bfloat16" with
    # model.dtype "float32" = f32 activations and bf16 matmul inputs (~1.9x faster products on CPUs with
    # AVX512-BF16; what a TPU's default precision does to f32 matmuls anyway).
    c.model.dot_dtype = ""

    # ---------------- init: where the weights start ----------------
    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # path for instit_jax.load_pretrained (HF dir, Orbax dir, workdir); "" = random
    c.init.tokenizer = ""  # tokenizer.json path or dir; "" = next to init.checkpoint

    # ---------------- data: weighted mixture of TFRecord sources ----------------
    c.data = ml_collections.ConfigDict()
    c.data.kind = "grain"  # "grain" (TFRecord mixture) or "random" (random tokens/pixels, smoke tests)
    # name -> {path: shard directory written by instit-build-data, weight: sampling weight (need not sum to 1)}.
    c.data.sources = ml_collections.ConfigDict()
    c.data.template = "vicuna_v1"  # chat template ("vicuna_v1" or "qwen_1_5")
    c.data.mask_policy = "answers"  # trained tokens: chat_template.MASK_POLICIES (answers / reference / all)
    c.data.max_tokens = 6144  # fixed sequence length T (6K context, as in the paper)
    c.data.length_buckets = ()  # pad each batch to the smallest bucket >= its longest sample (one compile per
    #                            bucket; single-process runs only; buckets > max_tokens unused); () -> max_tokens
    c.data.max_tiles = 5  # fixed anyres tiles N per sample incl. the base view (672x672 grid + base)
    c.data.max_frames = 32  # fixed video frames F per sample (uniformly sampled)
    c.data.images_per_batch = True  # batches carry pixel_values[B,N,...]
    c.data.videos_per_batch = True  # batches carry pixel_values_videos[B,F,...]
    c.data.shuffle = True  # global shuffle of the mixture
    c.data.cache_samples = False  # keep processed samples in host RAM after first use (small, many-epoch sets)
    c.data.num_epochs = 1  # epochs over the mixture (paper: 1)
    c.data.worker_count = 0  # Grain worker processes per host (0 = in-process)
    c.data.num_examples = 0  # examples in one epoch; 0 = ask the pipeline (used for total steps)
    c.data.packing = False  # several conversations per row of max_tokens (block-diagonal attention, RoPE
    #                        restarting per conversation); train.global_batch_size then counts rows
    c.data.max_views = 0  # packing: tiles + frames the tower runs on per row; 0 -> max_tiles + max_frames
    c.data.packing_bins = 0  # packing: rows filled at once by first fit; 0 -> 4 x the per-host batch

    # ---------------- optim: AdamW, warmup then cosine ----------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-5  # peak lr of the language model, projector and image_newline
    c.optim.vision_lr = 2e-6  # peak lr of the trainable vision blocks
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.0  # decoupled weight decay (never on norms, biases or 1-D params)
    c.optim.warmup_ratio = 0.03  # linear warmup as a fraction of total steps
    c.optim.schedule = "cosine"  # "cosine" (to end_lr_ratio) or "constant" after warmup
    c.optim.end_lr_ratio = 0.0  # final lr / peak lr for cosine
    c.optim.grad_clip = 1.0  # global-norm clip over trainable grads; 0 = off
    c.optim.z_loss = 0.0  # coefficient of log(Z)^2 on trained tokens; 0 = off
    c.optim.mu_dtype = "float32"  # Adam first-moment dtype; "bfloat16" halves it (-2 bytes/param: 16 GiB chips)

    # ---------------- freeze: which parameters train ----------------
    c.freeze = ml_collections.ConfigDict()
    c.freeze.frozen_vision_layers = 12  # first K vision blocks (+ embeddings, pre-LN) frozen
    c.freeze.train_vision = True  # train the vision blocks after the first K
    c.freeze.train_projector = True  # train the mlp2x_gelu projector
    c.freeze.train_llm = True  # train the language model (and image_newline)

    # ---------------- lora: low-rank adapters on the language model instead of full tuning ----------------
    # With rank > 0 the decoder's own weights stay frozen (no Adam state) and A [in, r] / B [r, out] train at
    # optim.lr; exports (save_pretrained, instit-convert jax-to-hf) hold W + alpha/r * A @ B. LLaVA's LoRA
    # recipes use r=128, alpha=256, dropout 0.05.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # adapter rank r; 0 = off (full tuning per freeze.train_llm)
    c.lora.alpha = 16.0  # the update is scaled by alpha / rank
    c.lora.dropout = 0.0  # dropout on the adapter input while training
    # decoder Linear layers that get adapters (any of these seven)
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    # ---------------- train: loop, batch geometry, robustness ----------------
    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 256  # sequences per optimizer step, over all hosts
    c.train.micro_batch_size = 0  # max sequences per device per micro-step (capped at the per-device batch); 0 = all
    c.train.total_steps = 0  # optimizer steps; 0 = num_epochs * num_examples / global_batch_size
    # Rematerialisation per block: "none", "full", "dots_saveable" (also keeps attention scores: huge at
    # 6K tokens), "dots_with_no_batch_dims_saveable" (keeps projection/MLP matmuls only).
    c.train.remat = "dots_with_no_batch_dims_saveable"
    c.train.loss_chunk_tokens = 1024  # LM head + cross-entropy in chunks of this many positions (memory)
    # LM head + cross-entropy only on each row's trained positions (gathered before the head); same loss
    c.train.head_on_supervised = True
    c.train.vision_chunk_views = 0  # tiles/frames per vision-tower pass per sample; 0 = all views at once
    c.train.vocab_parallel_loss = False  # split LM-head logits along the vocabulary (152k vocab, 16 GiB chips)
    c.train.mlp_sequence_pieces = 0  # decoder MLPs over the sequence in this many slices; 0 = whole sequence
    c.train.log_every = 10  # steps between metric lines
    c.train.checkpoint_every = 500  # steps between checkpoints
    c.train.keep_checkpoints = 3  # checkpoints kept (oldest deleted)
    c.train.keep_best_checkpoints = 0  # also keep the N lowest-loss params under WORKDIR/best (0 = off)
    c.train.async_checkpointing = True  # write checkpoints in a background thread
    c.train.max_nonfinite_steps = 5  # stop after this many non-finite steps in a row
    c.train.peak_flops_per_device = 0.0  # for MFU; 0 = guess from the device kind
    c.train.progress_bar = True  # tqdm bar with ETA on process 0

    # ---------------- mesh: device layout ----------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # data-parallel axis inside a slice (-1 = fill)
    c.mesh.fsdp = -1  # fully-sharded axis inside a slice (-1 = fill): the pure-FSDP default
    c.mesh.tensor = 1  # tensor-parallel axis inside a slice
    c.mesh.dcn_data = -1  # data-parallel axis across slices (-1 = number of slices)
    c.mesh.dcn_fsdp = 1  # fsdp across slices (rarely useful over DCN)
    c.mesh.dcn_tensor = 1  # tensor parallel across slices (never useful; keep 1)
    c.mesh.rules = "fsdp"  # logical-axis rules table: "fsdp", "fsdp_tp", or "replicated"
    c.mesh.distributed = "auto"  # jax.distributed.initialize(): "auto" (multi-host only), "on", "off"
    c.lock()  # recipes and command-line overrides may change fields, never add them
    return c


def add_source(c: ml_collections.ConfigDict, name: str, path: str, weight: float) -> None:
    """Add one weighted data source `name` (an instit-build-data shard directory) to `c.data.sources`."""
    with c.data.sources.unlocked():
        c.data.sources[name] = ml_collections.ConfigDict({"path": path, "weight": float(weight)})


def recipe_variant(arg: str | None, recipe: str, variants: tuple[str, ...]) -> str:
    """The variant picked by `configs/<recipe>.py:<variant>` ("" when the path names none)."""
    arg = (arg or "").strip()
    if arg and arg not in variants:
        raise ValueError(f"configs/{recipe}.py has no variant {arg!r}; variants: "
                         f"{', '.join(f'configs/{recipe}.py:{v}' for v in variants)}, or the bare path")
    return arg


def fit_16gib_chips(c: ml_collections.ConfigDict, micro_batch_size: int) -> None:
    """The memory settings that fit a 7B recipe on 16 GiB chips (v5e): same model, data, lr, global batch.

    instit-compile on v5e:4x4 gives the XLA peaks (docs/tpu_pods.md); the recipe defaults (per-layer dots
    remat, f32 Adam moments) overflow 16 GiB even at micro-batch 1.
    """
    c.train.remat = "full"  # recompute every block: only the block inputs are kept
    c.optim.mu_dtype = "bfloat16"  # -2 bytes per trained parameter (second moment stays f32)
    c.train.loss_chunk_tokens = 256  # smaller LM-head / cross-entropy chunks
    # tiles/frames per vision-tower pass (0 = all at once); the tower attention is blockwise because
    # model.attention_impl is (models.config.ComputeConfig.vision_attention_impl)
    c.train.vision_chunk_views = 8
    # LM-head logits split along the vocabulary over the devices: the head is never all-gathered
    c.train.vocab_parallel_loss = True
    c.train.mlp_sequence_pieces = 4  # decoder MLPs over the sequence in 4 slices (the [T, intermediate] buffers)
    c.train.micro_batch_size = micro_batch_size  # the largest per-device micro-batch that fits
