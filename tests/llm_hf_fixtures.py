"""Test helpers: tiny random transformers Llama/Qwen2 models and a copy of their weights into our Decoder."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from instit_jax.models.config import TextConfig
from instit_jax.models.llm import Decoder

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256)


def tiny_hf_lm(kind: str, *, kv_heads: int = 2, tied: bool = False, seed: int = 0):
    """A tiny random LlamaForCausalLM / Qwen2ForCausalLM (eval mode, fp32, eager attention)."""
    torch.manual_seed(seed)
    if kind == "llama":
        hf_cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                                          rope_theta=10000.0, tie_word_embeddings=tied, pad_token_id=0)
    else:
        hf_cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                                          rope_theta=1_000_000.0, tie_word_embeddings=tied, pad_token_id=0)
    hf_cfg._attn_implementation = "eager"
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    model = cls(hf_cfg).eval()
    with torch.no_grad():  # random non-trivial norm scales and biases so a mapping slip shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
            else:  # larger than HF's 0.02 init so greedy outputs vary instead of repeating one token
                p.copy_(torch.randn_like(p) * 0.25)
    return model


def text_config_of(hf_model) -> TextConfig:
    c = hf_model.config
    rope = getattr(c, "rope_parameters", None) or {}
    return TextConfig(
        model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        rms_norm_eps=c.rms_norm_eps, rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 1e4))),
        max_position_embeddings=c.max_position_embeddings, attention_bias=c.model_type == "qwen2",
        tie_word_embeddings=bool(c.tie_word_embeddings),
    )


def _set(var, arr: np.ndarray) -> None:
    if tuple(var[...].shape) != arr.shape:
        raise ValueError(f"shape mismatch {var[...].shape} vs {arr.shape}")
    var[...] = jnp.asarray(arr, var[...].dtype)


def copy_hf_weights(hf_model, decoder: Decoder) -> None:
    """Copy every HF tensor into the decoder (Linear weights transposed); fails on any unused key."""
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    used = set()

    def take(key):
        used.add(key)
        return sd[key]

    _set(decoder.embed_tokens.embedding, take("model.embed_tokens.weight"))
    _set(decoder.norm.weight, take("model.norm.weight"))
    if not decoder.cfg.tie_word_embeddings:
        _set(decoder.lm_head.kernel, take("lm_head.weight").T)
    else:
        used.add("lm_head.weight")
    for i, layer in enumerate(decoder.layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, name)
            _set(lin.kernel, take(p + f"self_attn.{name}.weight").T)
            if lin.bias is not None:
                _set(lin.bias, take(p + f"self_attn.{name}.bias"))
        for name in ("gate_proj", "up_proj", "down_proj"):
            _set(getattr(layer.mlp, name).kernel, take(p + f"mlp.{name}.weight").T)
        _set(layer.input_layernorm.weight, take(p + "input_layernorm.weight"))
        _set(layer.post_attention_layernorm.weight, take(p + "post_attention_layernorm.weight"))
    unused = set(sd) - used
    if unused:
        raise KeyError(f"HF keys not copied: {sorted(unused)}")


def decoder_from_hf(hf_model, dtype=jnp.float32, **compute) -> Decoder:
    """Our Decoder with the HF model's weights; compute: Decoder keyword arguments (attention_impl, ...)."""
    dec = Decoder(text_config_of(hf_model), dtype=dtype, rngs=nnx.Rngs(0), **compute)
    copy_hf_weights(hf_model, dec)
    return dec
