"""One LLaVA-NeXT SFT step on CPU: transformers + torch AdamW vs our jitted step (same model, same batch).

Model: a small random LLaVA-NeXT (CLIP-style tower 112 px / patch 14, width 256, 4 blocks with the first 2
frozen; Llama decoder width 512, 4 blocks, vocab 8000), built in transformers, saved, and loaded into
instit-jax with `load_pretrained`, so both stacks start from identical weights. Batch: B sequences of T
tokens, one anyres image each (base view + 1 tile), loss on the text tail only. AdamW (lr 1e-4, no weight
decay), the first K vision blocks frozen (torch: requires_grad=False; ours: optimizer labels +
stop_gradient). Two precision pairs, each stack at the same precision: fp32 (torch f32 vs ours f32), and
mixed (torch bf16 autocast vs ours with `model.dot_dtype=bfloat16`: bf16 matmul operands, f32
accumulation, activations and master weights f32); `--no-bf16` runs the fp32 pair only. Step times are
medians of alternating runs (same machine load for all). Our FLOP/s = XLA's compiled FLOP count of the step
/ our step time, as a fraction of a matmul peak (jnp.dot of 2048x2048 with f32 and with bf16 operands, f32
result, XLA) timed in the same alternating rounds (median; the best single f32 matmul is reported too).
Per-step process CPU time (all threads) is reported: on a shared host it moves far less than wall time.
Last line: one JSON object (`speedup` = the fp32 pair, `speedup_bf16` = the mixed pair, `speedup_fastest`
= torch's faster setting over ours).
Usage: python benchmarks/train_step.py [--batch 4] [--tokens 256] [--repeats 5] [--no-bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

from instit_jax import processing  # noqa: E402
from instit_jax import sharding as shd  # noqa: E402
from instit_jax.loading import load_pretrained  # noqa: E402
from instit_jax.train import optim  # noqa: E402
from instit_jax.train import state as st  # noqa: E402
from instit_jax.train import step as stp  # noqa: E402
from instit_jax.train.config import compute_config, load_config  # noqa: E402

PINS = [[112, 224], [224, 112], [224, 224]]
IMG = 7999
FROZEN = 2


def build_pair(directory: str):
    """(transformers model, our model) with identical random weights."""
    torch.manual_seed(0)
    vc = T.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            image_size=112, patch_size=14)
    tc = T.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
    cfg = T.LlavaNextConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_index=IMG,
                            image_grid_pinpoints=PINS, vision_feature_layer=-2)
    hf = T.LlavaNextForConditionalGeneration(cfg)
    hf.save_pretrained(directory)
    return hf, load_pretrained(directory)


def make_batch(batch: int, tokens: int, model):
    """HF inputs (NCHW tiles, image_sizes, labels) and our training batch (pipeline.py layout) for the same samples."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    rng = np.random.default_rng(0)
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112},
                                      image_grid_pinpoints=PINS)
    images = [rng.integers(0, 256, (112, 224, 3), dtype=np.uint8) for _ in range(batch)]
    enc = proc(images=images, return_tensors="np")
    n_img = processing.token_planner(model.cfg).image((112, 224)).count
    ids = rng.integers(10, 7000, (batch, tokens + 1)).astype(np.int64)
    ids[:, 1:1 + n_img] = IMG
    mask = np.ones((batch, tokens), np.int64)
    loss_mask = np.zeros((batch, tokens), np.float32)
    loss_mask[:, 1 + n_img:tokens - 1] = 1.0  # next-token targets after the image (HF has no label for T-1)
    labels = ids[:, :tokens].copy()
    labels[:, :2 + n_img] = -100  # HF shifts labels inside: label t is predicted at t-1
    hf_in = dict(input_ids=torch.from_numpy(ids[:, :tokens]), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(enc["pixel_values"]), image_sizes=torch.from_numpy(enc["image_sizes"]),
                 labels=torch.from_numpy(labels))
    vi, _ = model.visual_index_for(ids[:, :tokens], enc["image_sizes"], np.ones(batch, bool),
                                   enc["pixel_values"].shape[1], 0)
    ours = dict(input_ids=ids[:, :tokens].astype(np.int32), attention_mask=mask.astype(np.int32),
                targets=ids[:, 1:].astype(np.int32), loss_mask=loss_mask, visual_index=vi.astype(np.int32),
                pixel_values=enc["pixel_values"].transpose(0, 1, 3, 4, 2).astype(np.float32))
    return hf_in, ours


def matmul_probe(dtype, n: int = 2048):
    """(run, FLOPs): one n x n matmul with `dtype` operands and an f32 result on this CPU (XLA), compiled and
    warmed up."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    return (lambda: f(a).block_until_ready()), 2 * n**3


def timed(fn, wall: list[float], cpu: list[float]):
    """Run fn once, appending its wall and process CPU seconds."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="skip the mixed-precision pair (torch bf16 autocast vs our bf16 matmul operands)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        hf, ours_model = build_pair(d)
        hf_bf16 = T.LlavaNextForConditionalGeneration.from_pretrained(d) if args.bf16 else None
    hf_in, batch = make_batch(args.batch, args.tokens, ours_model)

    # ---- transformers + torch AdamW: f32, and bf16 autocast (torch's mixed precision on CPU) ----
    def torch_stepper(model, autocast: bool):
        for i in range(FROZEN):
            model.model.vision_tower.encoder.layers[i].requires_grad_(False)
        model.model.vision_tower.embeddings.requires_grad_(False)
        model.model.vision_tower.pre_layrnorm.requires_grad_(False)
        topt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        model.train()

        def torch_step():
            topt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**hf_in).loss
            loss.backward()
            topt.step()
            return float(loss.detach())
        return torch_step

    # ---- ours, as the trainer builds it: f32, and bf16 operands with f32 accumulation (model.dot_dtype) ----
    def jax_stepper(dot_dtype: str):
        config = load_config("configs/tiny.py", [
            "model.vision.num_hidden_layers=4", f"freeze.frozen_vision_layers={FROZEN}", "optim.lr=1e-4",
            "optim.vision_lr=1e-4", "optim.warmup_ratio=0.0", "optim.schedule=constant", "optim.grad_clip=0.0",
            "optim.eps=1e-8", f"model.dot_dtype={dot_dtype}"])
        mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        model = ours_model.with_compute(compute_config(config, mesh.devices.flat[0].platform))  # as the trainer
        split, params = st.split_model(model)
        b = dict(batch)
        if config.train.head_on_supervised:  # as the trainer's next_batch: the LM head on trained positions only
            b["loss_index"] = stp.supervised_index(b["loss_mask"], config.train.loss_chunk_tokens)
        tx, labels, _ = optim.make_optimizer(config, params, 1000)
        shardings = st.state_shardings(split, tx, mesh, "replicated")
        box = {"state": st.init_state(params, tx, shardings)}
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
        step = stp.make_train_step(split, tx, labels, mesh=mesh, shardings=shardings, batch_shapes=shapes,
                                   num_microbatches=1, frozen_layers=FROZEN)
        compiled = step.lower(st.abstract_state(split, tx, shardings), shapes).compile()
        cost = compiled.cost_analysis()
        flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        gbatch = jax.device_put(b)

        def jax_step():
            box["state"], m = compiled(box["state"], gbatch)
            return float(m["loss"])
        return jax_step, flops

    contenders = {"torch f32": torch_stepper(hf, False)}
    ours_f32, flops = jax_stepper("")
    contenders["ours f32"] = ours_f32
    if args.bf16:
        contenders["torch bf16"] = torch_stepper(hf_bf16, True)
        contenders["ours bf16"] = jax_stepper("bfloat16")[0]
    first = {k: fn() for k, fn in contenders.items()}  # warm-up; first losses should agree (same weights, batch)
    probes = {"matmul f32": matmul_probe(jnp.float32)}
    if args.bf16:
        probes["matmul bf16"] = matmul_probe(jnp.bfloat16)
    runs = {k: (fn, [], []) for k, fn in contenders.items()} | {k: (fn, [], []) for k, (fn, _) in probes.items()}
    for _ in range(args.repeats):
        for fn, wall, cpu in runs.values():
            timed(fn, wall, cpu)
    med = {k: (statistics.median(w), statistics.median(c)) for k, (_, w, c) in runs.items()}
    peak = {k: f / med[k][0] for k, (_, f) in probes.items()}
    best_peak = probes["matmul f32"][1] / min(runs["matmul f32"][1])
    peak_cpu = probes["matmul f32"][1] / med["matmul f32"][1]
    print(f"{'':22s}{'first loss':>12s}{'step (s)':>10s}{'CPU (s)':>10s}")
    for k in contenders:
        print(f"{k:22s}{first[k]:>12.4f}{med[k][0]:>10.4f}{med[k][1]:>10.4f}")
    (t_torch, c_torch), (t_ours, c_ours) = med["torch f32"], med["ours f32"]
    print(f"f32 speed-up (torch / ours): {t_torch / t_ours:.2f}x wall, {c_torch / c_ours:.2f}x CPU time   "
          f"threads: torch {torch.get_num_threads()}")
    print(f"our f32 step: {flops:.3e} FLOPs (XLA count), {flops / t_ours:.3e} FLOP/s = "
          f"{flops / t_ours / peak['matmul f32']:.1%} of the f32 matmul peak {peak['matmul f32']:.3e} FLOP/s "
          f"(median, same rounds; {flops / t_ours / best_peak:.1%} of its best run {best_peak:.3e}); per CPU-second: "
          f"{flops / c_ours / peak_cpu:.1%} of the matmul's")
    out = {"benchmark": "train_step", "batch": args.batch, "tokens": args.tokens,
           "torch_step_s": t_torch, "ours_step_s": t_ours, "speedup": t_torch / t_ours,
           "torch_cpu_s": c_torch, "ours_cpu_s": c_ours, "speedup_cpu": c_torch / c_ours,
           "first_loss_torch": first["torch f32"], "first_loss_ours": first["ours f32"], "our_flops_per_step": flops,
           "our_flops_per_s": flops / t_ours, "matmul_peak_flops_per_s": peak["matmul f32"],
           "matmul_best_flops_per_s": best_peak, "fraction_of_peak": flops / t_ours / peak["matmul f32"],
           "fraction_of_best_peak": flops / t_ours / best_peak,
           "fraction_of_peak_cpu": flops / c_ours / peak_cpu}
    if args.bf16:
        (tb_torch, _), (tb_ours, _) = med["torch bf16"], med["ours bf16"]
        fastest_torch, fastest_ours = min(t_torch, tb_torch), min(t_ours, tb_ours)
        print(f"bf16 speed-up (torch autocast / ours bf16 operands): {tb_torch / tb_ours:.2f}x wall; our bf16 step at "
              f"{flops / tb_ours / peak['matmul bf16']:.1%} of the bf16-operand matmul peak "
              f"{peak['matmul bf16']:.3e} FLOP/s; fastest torch / fastest ours: {fastest_torch / fastest_ours:.2f}x")
        out |= {"torch_bf16_step_s": tb_torch, "ours_bf16_step_s": tb_ours, "speedup_bf16": tb_torch / tb_ours,
                "first_loss_torch_bf16": first["torch bf16"], "first_loss_ours_bf16": first["ours bf16"],
                "matmul_bf16_peak_flops_per_s": peak["matmul bf16"],
                "fraction_of_bf16_peak": flops / tb_ours / peak["matmul bf16"],
                "speedup_fastest": fastest_torch / fastest_ours}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
