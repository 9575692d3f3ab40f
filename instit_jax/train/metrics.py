"""Metrics: `WORKDIR/metrics.jsonl` + TensorBoard, and the analytic model-FLOPs count behind MFU."""
from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
from etils import epath

METRICS_NAME = "metrics.jsonl"

# Dense bf16 peak FLOP/s per device by device_kind substring (vendor figures).
PEAK_FLOPS = {
    "v6": 918e12, "v5p": 459e12, "v5 lite": 197e12, "v5e": 197e12, "v4": 275e12, "v3": 123e12,
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12,
}


def peak_flops_per_device(config_value: float = 0.0, device: Any = None) -> float:
    """Configured peak, else the vendor figure for the device kind; 0.0 when unknown (CPU)."""
    if config_value > 0:
        return float(config_value)
    kind = str(getattr(device or jax.devices()[0], "device_kind", "")).lower()
    for key, value in PEAK_FLOPS.items():
        if key in kind:
            return value
    return 0.0


def model_flops_per_step(config: ml_collections.ConfigDict, tokens_per_tile: int, tokens_per_frame: int,
                         num_tiles: int, num_frames: int, seq_len: int | None = None) -> float:
    """Useful FLOPs of one optimizer step (forward + backward, no remat), for MFU and the AOT ratio.

    LLM: 6 * matmul params * tokens + 12 * layers * T^2 * attention width per sequence (full, not
    causal-halved). Vision: frozen blocks forward only (2x), trainable ones 6x; projector 6x.
    `seq_len` overrides T = data.max_tokens (batches padded to a length bucket).
    """
    m, t = config.model, seq_len or config.data.max_tokens
    g = config.train.global_batch_size
    tx, v = m.text, m.vision
    hd = tx.head_dim or tx.hidden_size // tx.num_attention_heads
    d, q, kv = tx.hidden_size, tx.num_attention_heads * hd, tx.num_key_value_heads * hd
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * tx.intermediate_size
    llm_params = tx.num_hidden_layers * per_layer + d * tx.vocab_size  # + LM head
    llm = 6 * llm_params * t + 12 * tx.num_hidden_layers * t * t * q
    train_llm = config.freeze.train_llm
    if not train_llm:
        llm = llm * 2 / 3  # backward still runs through the LLM for the input gradient
    vd = v.hidden_size
    v_tokens = (v.image_size // v.patch_size) ** 2 + (1 if v.model_type == "clip" else 0)
    block_params = 4 * vd * vd + 2 * vd * v.intermediate_size
    block = 2 * block_params * v_tokens + 4 * v_tokens * v_tokens * vd  # one forward
    used = m.vision_feature_layer % (v.num_hidden_layers + 1)
    frozen = min(config.freeze.frozen_vision_layers, used) if config.freeze.train_vision else used
    views = num_tiles + num_frames
    vision = views * block * (frozen + 3 * (used - frozen))
    projector = 6 * views * v_tokens * (vd * d + d * d)
    return float(g * (llm + vision + projector))


class MetricsWriter:
    """Append one JSON line per logged step; mirror scalars to TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = epath.Path(workdir) / METRICS_NAME
        self.tb = None
        if not self.active:
            return
        if self.path.exists():  # drop lines a crashed run logged after the checkpoint we resume from
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, val in record.items():
                if k != "step" and isinstance(val, (int, float)) and val is not None:
                    self.tb.add_scalar(f"train/{k}", val, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of `WORKDIR/metrics.jsonl`."""
    path = epath.Path(workdir) / METRICS_NAME
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []
