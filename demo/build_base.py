"""`instit-demo build-base --out DIR [--hours H]`: build the demo's LLaVA-NeXT base from random init.

The stages mirror the real lineage (a CLIP tower, an LLM, LLaVA's projector alignment, LLaVA's visual
instruction tuning), each probed before the next; recipe: `configs/demo_base.py`:

  0 tokenizer  byte-level BPE trained once on the world's whole vocabulary (shipped with the base)
  1 tower      the vision tower alone on dense per-patch labels: colour / shape / texture / size of the
               instance under each patch of unmarked scenes (random erasing on top), the digit on each
               patch of plain digit canvases, the instance count on the class token
  2 text       the decoder on text-only reading: a scene description, then QA and MC-with-letters turns
  3 align      the projector alone on captions of unmarked images and videos
  4 instruct   generic visual instruction tuning on unmarked media (counting, presence, attributes of the
               only / largest / a named object, relations of named shapes, motion, digit reading; MC + OE)
  5 tower_labels, reinstruct, bind   the tower on printed labels (digits centred in a patch cell), generic
               instruction tuning again on it, then finding a printed label by its digit on label canvases
  6 drill      generic visual instruction tuning on packed rows (the demo's SFT recipe), ~22k conversations:
               where the base learns to reply with the letter of the answer it knows
  7 ground     the drill again with a patch-to-word loss beside it: each labelled patch's visual token is pulled
               toward the decoder's embeddings of the words naming it (colour, shape, texture, size, digit)
  8 export     a llava-hf folder (config, safetensors, tokenizer, processor) and the model card

No stage sees a Set-of-Marks frame or a question that names an instance by an ID: that is what Inst-IT
adds. Every stage is deterministic for `--seed` and resumable: its state lives under DIR (the tower's
Orbax checkpoints, the trainer's workdirs, `DIR/build.json` with each finished stage's probe and time),
so a stopped build continues where it was. `--hours` scales every stage's step count (and data sizes)
from the recipe's nominal length (`NOMINAL_HOURS` on this 2-core machine).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from demo import world as W

NOMINAL_HOURS = 2.0
DATA = {  # nominal data sizes (scaled with --hours like the steps)
    "text": 12_000, "captions_images": 4_000, "captions_videos": 1_000,
    "generic_images": 12_000, "generic_videos": 3_000, "generic_digits": 2_500,
    "lookup": 8_000, "generic2_images": 6_000, "generic2_videos": 1_500, "generic2_labels": 2_500,
    "label_lookup": 4_000,
}
PROBE = {"images": 60, "videos": 30, "digits": 20}
log = logging.getLogger("instit_demo.build_base")


class Build:
    """The build's on-disk state: DIR/build.json {stage: {wall_s, probe, ...}} (finished stages only)."""

    def __init__(self, out: Path, seed: int, scale: float):
        self.out = out
        self.seed = seed
        self.scale = scale
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "build.json"
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        want = {"seed": seed, "scale": scale}
        have = self.state.get("settings")
        if have is not None and have != want:
            raise SystemExit(f"{out}: a build with {have} is under way here; resume it with the same "
                             f"--seed/--hours, or use another --out (asked: {want})")
        self.state["settings"] = want
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.path)

    def done(self, stage: str) -> bool:
        return stage in self.state.get("stages", {})

    def finish(self, stage: str, wall_s: float, **info: Any) -> None:
        self.state.setdefault("stages", {})[stage] = {"wall_s": round(wall_s, 1), **info}
        self._write()
        log.warning("[build-base] %s done in %.0fs %s", stage, wall_s, json.dumps(info)[:400])

    def steps(self, config) -> int:
        return max(10, int(round(config.train.total_steps * self.scale)))

    def size(self, name: str) -> int:
        return max(8, int(round(DATA[name] * self.scale)))


# ------------------------------------------------------------------------------------------- tokenizer


def tokenizer_corpus(seed: int) -> list[str]:
    """Every kind of text the base and the demo's Inst-IT stage will tokenize (not training data of the
    model: the Inst-IT world's text is here so the demo's marked conversations tokenize compactly)."""
    from data_gen.synthetic import generate_world
    from demo import base_data as B
    from demo.conversations import json_strings
    from eval.prompts import DEFAULT_TEMPLATES
    from instit_jax.chat_template import get_template, render_prompt
    from instit_jax.data import annotations_to_llava as C

    texts: list[str] = []

    def walk(x: Any) -> None:
        json_strings(x, out=texts)

    walk(B.text_reading_conversations(seed + 7, 600))
    for k in range(400):
        rng = np.random.default_rng([seed, k, 61])
        scene, _ = B.sample_scene(rng, W.BASE_DIFFICULTY)
        walk(B.qa_conversation(B.generic_image_questions(scene), rng, "image", 8))
        vscene, _ = B.sample_scene(rng, W.BASE_VIDEO_DIFFICULTY, num_frames=W.FRAMES)
        walk(B.qa_conversation(B.generic_video_questions(vscene), rng, "video", 8))
        walk(B.qa_conversation(B.digit_questions(B.digit_canvas(rng)[1]), rng, "image", 3))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # Inst-IT-style text of the world (its media are discarded)
        paths = generate_world(Path(tmp) / "w", num_images=150, num_videos=60, frames_per_video=W.FRAMES,
                               seed=seed + 90_001, difficulty=W.WORLD_DIFFICULTY)
        walk(json.loads(Path(paths["image_json"]).read_text()))
        walk(json.loads(Path(paths["video_json"]).read_text()))
    for name in dir(C):
        if name.endswith("_PROMPTS"):
            walk(list(getattr(C, name)))
    walk(DEFAULT_TEMPLATES)
    walk(B.CAPTION_PROMPTS)
    tmpl = get_template("vicuna_v1")
    chat = render_prompt(tmpl, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 2,
                         add_generation_prompt=False)
    texts += [chat] * (len(texts) // 4)
    texts += ["A", "B", "C", "D", *[f"[{k}]" for k in range(1, 16)], *[f"<{k}>" for k in range(1, 33)]] * 50
    return texts


def build_tokenizer(build: Build) -> Path:
    from configs.demo_base import VOCAB_SIZE
    from instit_jax.chat_template import IMAGE_TOKEN
    from instit_jax.tokenizer import train_tiny_tokenizer

    path = build.out / "tokenizer.json"
    if build.done("tokenizer") and path.exists():
        return path
    t = time.time()
    tok = train_tiny_tokenizer(tokenizer_corpus(build.seed), vocab_size=VOCAB_SIZE - 1)
    tok.add_special_tokens([IMAGE_TOKEN]) if tok.token_to_id(IMAGE_TOKEN) is None else None
    tok.save(str(path))
    build.finish("tokenizer", time.time() - t, vocab_size=tok.get_vocab_size(),
                 image_token_id=tok.token_to_id(IMAGE_TOKEN))
    return path


def stage_config(stage: str, tok_path: Path, sources: dict[str, tuple[str, float]], build: Build):
    from configs.demo_base import get_config
    from instit_jax.chat_template import IMAGE_TOKEN
    from instit_jax.loading import load_tokenizer

    tok = load_tokenizer(tok_path)
    c = get_config(stage)
    c.seed = build.seed
    c.model.text.vocab_size = tok.get_vocab_size()
    c.model.image_token_id = tok.token_to_id(IMAGE_TOKEN)
    c.init.tokenizer = str(tok_path)
    with c.data.sources.unlocked():
        c.data.sources = {}
        for k, (path, w) in sources.items():
            c.data.sources[k] = {"path": path, "weight": w}
    c.train.total_steps = build.steps(c)
    c.train.checkpoint_every = min(c.train.checkpoint_every, c.train.total_steps)
    c.train.progress_bar = True
    return c


# ------------------------------------------------------------------------------------------------ tower


def normalise(pixels):
    """uint8 RGB pixels [..., S, S, 3] -> the tower's input (the base's preprocessor: CLIP mean / std)."""
    import jax.numpy as jnp

    from instit_jax.processing import CLIP_MEAN, CLIP_STD

    mean, std = jnp.asarray(CLIP_MEAN, jnp.float32) * 255.0, jnp.asarray(CLIP_STD, jnp.float32) * 255.0
    return (pixels.astype(jnp.float32) - mean) / std


def tower_parts(cfg, seed: int):
    """A fresh LlavaNextModel, the (tower, dense heads) graphdef + params, and `forward(params, pixels)`.

    The heads read the tower's feature layer (what the projector reads): per patch one linear map per
    label head after a LayerNorm, and the instance count from the class token.
    """
    from flax import nnx

    from demo import base_data as B
    from instit_jax.models.llava_next import LlavaNextModel

    model = LlavaNextModel(cfg, rngs=nnx.Rngs(seed))
    dim = cfg.vision.hidden_size

    class Heads(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.norm = nnx.LayerNorm(dim, rngs=rngs)
            self.patch = nnx.Dict({k: nnx.Linear(dim, n, rngs=rngs) for k, n in B.HEADS.items()})
            self.count = nnx.Linear(dim, W.MAX_COUNT + 1, rngs=rngs)

        def __call__(self, h):
            h = self.norm(h)
            return {k: lin(h[:, 1:]) for k, lin in self.patch.items()}, self.count(h[:, 0])

    heads = Heads(nnx.Rngs(seed + 1))
    graphdef, params = nnx.split((model.vision_tower, heads), nnx.Param)

    def forward(params, pixels):
        tower, hd = nnx.merge(graphdef, params)
        return hd(tower.hidden_state(normalise(pixels)))

    return model, graphdef, params, forward


# Per tower stage: (seed offset, digit-canvas share, digits anywhere across patch borders, label-canvas share).
TOWER_DATA = {
    "tower": (0, 0.3, False, 0.0),
    "tower_digits": (1, 0.75, True, 0.0),
    "tower_labels": (2, 0.15, True, 0.45),
}


def run_tower(build: Build, tok_path: Path, stage: str = "tower", after: str | None = None, init_model=None):
    """A tower stage on dense labels (own loop: the LLaVA trainer has no per-patch heads).

    `after`: start from that tower stage's final tower + heads (a fresh optimizer and schedule).
    `init_model`: start from this LLaVA model's tower (fresh heads); the stage returns that model with its
    tower replaced by the trained one (so the projector and decoder carry on)."""
    import grain
    import jax
    import jax.numpy as jnp
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx
    from tqdm import tqdm

    from demo import base_data as B
    from instit_jax.loading import load_pretrained, save_pretrained
    from instit_jax.train.config import llava_config

    model_dir = build.out / stage / "model"
    if build.done(stage) and model_dir.exists():
        return load_pretrained(model_dir)
    t0 = time.time()
    c = stage_config(stage, tok_path, {}, build)
    model, graphdef, params, forward = tower_parts(llava_config(c), build.seed)
    steps, bsz = c.train.total_steps, c.train.global_batch_size
    sched = optax.warmup_cosine_decay_schedule(0.0, c.optim.lr, max(1, int(steps * 0.03)), steps,
                                               c.optim.lr * c.optim.end_lr_ratio)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=c.optim.weight_decay))
    if after is not None:
        prev = ocp.CheckpointManager((build.out / after / "checkpoints").resolve())
        shape = {"params": params, "opt": tx.init(params)}
        params = prev.restore(prev.latest_step(), args=ocp.args.StandardRestore(shape))["params"]
    if init_model is not None:
        tower, heads = nnx.merge(graphdef, params)
        nnx.update(tower, nnx.state(init_model.vision_tower, nnx.Param))
        params = nnx.split((tower, heads), nnx.Param)[1]
        model = init_model
    opt_state = tx.init(params)
    seed_offset, digit_share, free, label_share = TOWER_DATA[stage]

    def balanced(logits, labels):
        """Mean CE over labelled patches + half the mean CE over "none" patches: the few instance / digit
        patches are not drowned by background (plain means left digits at 8% and shapes at 37%)."""
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        fg = (labels > 0).astype(ce.dtype)
        return ((ce * fg).sum() / jnp.maximum(fg.sum(), 1.0)
                + 0.5 * (ce * (1 - fg)).sum() / jnp.maximum((1 - fg).sum(), 1.0))

    def loss_fn(params, batch):
        logits, count = forward(params, batch["pixels"])
        losses = {k: balanced(v, batch[k]) for k, v in logits.items()}
        losses["count"] = optax.softmax_cross_entropy_with_integer_labels(count, batch["count"]).mean()
        return sum(losses.values()), losses

    @jax.jit
    def step(params, opt_state, batch):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    ckdir = (build.out / stage / "checkpoints").resolve()
    mgr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(max_to_keep=1))
    start = 0
    if mgr.latest_step() is not None:
        start = int(mgr.latest_step())
        got = mgr.restore(start, args=ocp.args.StandardRestore({"params": params, "opt": opt_state}))
        params, opt_state = got["params"], got["opt"]
        log.warning("[build-base] %s resumed at step %d", stage, start)
    # Batch i is a pure function of (seed, i): a resumed run reads exactly the batches it would have read.
    ds = (grain.MapDataset.range(start, steps)
          .map(lambda i: B.tower_batch(build.seed + seed_offset, int(i), bsz, digit_share, free, label_share))
          .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
    metrics_path = build.out / stage / "metrics.jsonl"
    every = 200
    bar = tqdm(total=steps, initial=start, desc=stage, unit="step", mininterval=5)
    with metrics_path.open("a") as mf:
        for i, batch in zip(range(start, steps), ds):
            params, opt_state, loss, parts = step(params, opt_state, batch)
            bar.update(1)
            if (i + 1) % 50 == 0:
                row = {"step": i + 1, "loss": float(loss), **{k: round(float(v), 4) for k, v in parts.items()}}
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                bar.set_postfix(loss=f"{float(loss):.3f}")
            if (i + 1) % every == 0 or i + 1 == steps:
                mgr.save(i + 1, args=ocp.args.StandardSave({"params": params, "opt": opt_state}), force=True)
    bar.close()
    mgr.wait_until_finished()

    probe = tower_probe(forward, params, build.seed, free_digits=free, labels=label_share > 0)
    tower, _ = nnx.merge(graphdef, params)
    nnx.update(model.vision_tower, nnx.state(tower, nnx.Param))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    save_pretrained(model, model_dir)
    build.finish(stage, time.time() - t0, steps=steps, batch=bsz, images=steps * bsz, probe=probe)
    return model


def tower_probe(forward, params, seed: int, batches: int = 8, free_digits: bool = False, labels: bool = False
                ) -> dict[str, float]:
    """Held-out per-patch accuracy: attributes on instance patches, digits on digit patches, counts;
    `labels`: also "label", the digit on each patch of label canvases (`base_data.label_canvas`)."""
    from demo import base_data as B

    hit: dict[str, list[float]] = {k: [] for k in (*B.HEADS, "count", *(("label",) if labels else ()))}
    for b in range(batches if labels else 0):
        batch = B.tower_batch(seed + 7_777_777, b, 64, label_share=1.0)
        pred, gold = np.asarray(forward(params, batch["pixels"])[0]["digit"]).argmax(-1), batch["digit"]
        hit["label"].append(float((pred[gold > 0] == gold[gold > 0]).mean()))
    for b in range(batches):
        batch = B.tower_batch(seed + 7_777_777, b, 64, free_digits=free_digits)
        logits, count = forward(params, batch["pixels"])
        for k, v in logits.items():
            pred, gold = np.asarray(v).argmax(-1), batch[k]
            fg = gold > 0
            hit[k].append(float((pred[fg] == gold[fg]).mean()) if fg.any() else np.nan)
        scene = batch["digit"].max(-1) == 0
        hit["count"].append(float((np.asarray(count).argmax(-1)[scene] == batch["count"][scene]).mean()))
    return {k: round(100 * float(np.nanmean(v)), 1) for k, v in hit.items()}


# --------------------------------------------------------------------------------------- trainer stages


def build_records(build: Build, name: str, make) -> Path:
    """`make(root) -> LLaVA JSON` under DIR/data/NAME, then TFRecords in DIR/records/NAME (once)."""
    from instit_jax.data.build import build as build_shards

    rec = build.out / "records" / name
    if (rec / "manifest.json").exists():
        return rec
    t0 = time.time()
    root = build.out / "data" / name
    root.mkdir(parents=True, exist_ok=True)
    js = make(root)
    if rec.exists():
        shutil.rmtree(rec)
    manifest = build_shards([str(js)], str(root), str(rec), 4)
    build.finish(f"data_{name}", time.time() - t0, records=manifest["num_records"])
    return rec


def run_trainer_stage(build: Build, stage: str, tok_path: Path, model, sources: dict[str, tuple[str, float]],
                      **overrides):
    import jax

    from instit_jax.loading import load_pretrained
    from instit_jax.sharding import make_mesh
    from instit_jax.train import train

    wd = (build.out / stage).resolve()
    if build.done(stage):
        return load_pretrained(str(wd))
    t0 = time.time()
    c = stage_config(stage, tok_path, sources, build)
    for k, v in overrides.items():
        sect, field = k.split(".")
        c[sect][field] = v
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    r = train(c, str(wd), model=model, mesh=mesh)
    out = r.model()
    seen = {("rows" if c.data.packing else "samples"): c.train.total_steps * c.train.global_batch_size}
    build.finish(stage, time.time() - t0, steps=c.train.total_steps, batch=c.train.global_batch_size, **seen)
    return out


# --------------------------------------------------------------------------------------- grounding stage
GROUND_TAU = 0.1  # temperature of the patch-to-word cosine logits
GROUND_WEIGHT = 1.0  # the patch-to-word loss beside the token-normalised LM loss
GROUND_IMAGES = 32  # tower-batch images per step (label canvases 35%, digit canvases, unmarked scenes)


def word_targets(tok) -> dict[str, np.ndarray]:
    """Per dense label head: class -> the decoder's token ids of the words that name it ([classes, 2], -1
    padded; class 0 "none" names nothing). Digits name two tokens: the bare digit ("[4]" tokenizes to " [",
    "4", "]") and the spaced one ("the number 4")."""
    def tid(text: str) -> int:
        i = tok.token_to_id(text)
        if i is None:
            raise ValueError(f"the base tokenizer has no single token {text!r}")
        return i

    table = {head: np.array([[-1, -1]] + [[tid("Ġ" + x), -1] for x in classes[1:]], np.int32)
             for head, classes in (("colour", W.COLOUR_CLASSES), ("shape", W.SHAPE_CLASSES),
                                   ("texture", W.TEXTURE_CLASSES), ("size", W.SIZE_CLASSES))}
    table["digit"] = np.array([[-1, -1]] + [[tid(d), tid("Ġ" + d)] for d in "0123456789"], np.int32)
    return table


def ground_batch(seed: int, index: int, table: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Tower batch `index` as (pixels uint8 [B,S,S,3], per-patch word targets int32 [B, G*G, 10])."""
    from demo import base_data as B

    tb = B.tower_batch(seed, index, GROUND_IMAGES, digit_share=0.25, free_digits=False, label_share=0.35)
    return tb["pixels"], np.concatenate([table[h][tb[h]] for h in ("colour", "shape", "texture", "size", "digit")],
                                        axis=-1)


def patch_word_loss(model, pixels, targets, frozen_layers: int):
    """Mean cross-entropy of each labelled patch's projected visual token against the decoder's input
    embeddings (cosine / GROUND_TAU over the vocabulary), one term per word that names the patch; and the
    share of labelled patches whose nearest token is one of their words. The embeddings get no gradient:
    the visual tokens move toward the words, not the words toward them."""
    import jax
    import jax.numpy as jnp

    z = model.image_features(normalise(pixels), frozen_layers=frozen_layers)
    emb = jax.lax.stop_gradient(model.language_model.embed_tokens.embedding[...])
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    logits = jnp.einsum("bpd,vd->bpv", unit(z), unit(emb)) / GROUND_TAU
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0), axis=-1)
    valid = (targets >= 0).astype(jnp.float32)
    loss = jnp.sum((jax.nn.logsumexp(logits, -1)[..., None] - picked) * valid) / jnp.maximum(valid.sum(), 1.0)
    labelled = valid.sum(-1) > 0
    nearest = jnp.any((jnp.argmax(logits, -1)[..., None] == targets) & (targets >= 0), -1)
    return loss, jnp.sum(nearest & labelled) / jnp.maximum(labelled.sum(), 1)


def run_ground(build: Build, stage: str, tok_path: Path, model, sources: dict[str, tuple[str, float]]):
    """Generic instruction tuning on packed rows (the drill's data and recipe) with a patch-to-word loss
    beside it: each labelled patch of a tower batch (unmarked scenes, digit and label canvases) is pulled
    toward the decoder's embeddings of the words that name it (`patch_word_loss`). Own loop over the
    trainer's setup (data, optimizer, frozen blocks): the LLaVA trainer has one loss. Checkpointed and
    resumable like the trainer (state + data iterator); tower batches are a pure function of the step."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tqdm import tqdm

    from instit_jax.loading import load_pretrained, load_tokenizer
    from instit_jax.sharding import make_mesh
    from instit_jax.train import step as stp
    from instit_jax.train.checkpoint import Checkpointer
    from instit_jax.train.state import merge_model
    from instit_jax.train.trainer import config_json, setup_training

    wd = (build.out / stage).resolve()
    if build.done(stage):
        return load_pretrained(str(wd))
    t0 = time.time()
    c = stage_config(stage, tok_path, sources, build)
    frozen_layers = c.freeze.frozen_vision_layers
    setup = setup_training(c, model=model, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    split, tx, steps = setup.split, setup.tx, setup.total_steps
    frozen = jax.tree.map(lambda lab: lab == "frozen", setup.labels)
    lm_loss = stp.make_loss_fn(split, frozen_layers=frozen_layers, z_loss=0.0, chunk=0)
    table = word_targets(load_tokenizer(tok_path))

    def word_loss(params, pixels, targets):
        return patch_word_loss(nnx.merge(split.graphdef, params, split.rest), pixels, targets, frozen_layers)

    @jax.jit
    def step(state, batch, pixels, targets):
        g_lm, (nll, ntok) = jax.grad(lm_loss, has_aux=True)(state.params, batch)
        (w_loss, nearest), g_w = jax.value_and_grad(word_loss, has_aux=True)(state.params, pixels, targets)
        denom = jnp.maximum(ntok, 1.0)
        grads = jax.tree.map(lambda a, b, fr: jnp.zeros_like(a) if fr else a / denom + GROUND_WEIGHT * b,
                             g_lm, g_w, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = dataclasses.replace(state, step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                    opt_state=opt_state)
        return state, {"loss": nll / denom, "word_loss": w_loss, "word_nearest": nearest}

    ckpt = Checkpointer(str(wd), keep=1, async_save=False)
    ckpt.write_configs(setup.model_config, json.dumps(config_json(c)))
    if ckpt.latest_step() is not None:
        state = ckpt.restore(setup.abstract, setup.data)
        log.warning("[build-base] %s resumed at step %d", stage, int(state.step))
    else:
        state = setup.init_state(model)
    start = int(state.step)
    bar = tqdm(total=steps, initial=start, desc=stage, unit="step", mininterval=5)
    with (wd / "metrics.jsonl").open("a") as mf:
        for i in range(start, steps):
            batch = {k: jnp.asarray(v) for k, v in setup.next_batch().items()}
            state, m = step(state, batch, *ground_batch(build.seed + 3, i, table))
            bar.update(1)
            if (i + 1) % 25 == 0:
                row = {"step": i + 1, **{k: round(float(v), 4) for k, v in m.items()}}
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", words=f"{row['word_nearest']:.2f}")
            if (i + 1) % c.train.checkpoint_every == 0 or i + 1 == steps:
                ckpt.save(state, setup.data, force=True)  # the last one is the stage's output (a workdir)
    bar.close()
    ckpt.close()
    out = merge_model(split, state.params)
    build.finish(stage, time.time() - t0, steps=steps, batch=c.train.global_batch_size,
                 rows=steps * c.train.global_batch_size, word_images=steps * GROUND_IMAGES)
    return out


def text_probe(model, tok_path: Path, seed: int, count: int = 64) -> dict[str, float]:
    """Held-out text-only reading: greedy answers to MC (letter) and OE (exact) questions."""
    from demo import base_data as B
    from instit_jax.chat_template import get_template, render_prompt
    from instit_jax.generate import generate
    from instit_jax.loading import load_tokenizer

    tok = load_tokenizer(tok_path)
    tmpl = get_template("vicuna_v1")
    prompts, gold, kinds = [], [], []
    for conv in B.text_reading_conversations(seed + 5_555_555, count, turns=1):
        turn = conv["conversations"]
        msgs = [{"role": "user", "content": turn[0]["value"]}]
        prompts.append(tok.encode(render_prompt(tmpl, msgs, add_generation_prompt=True),
                                  add_special_tokens=False).ids)
        gold.append(turn[1]["value"])
        kinds.append("mc" if turn[1]["value"] in ("A", "B", "C", "D") and "A. " in turn[0]["value"] else "oe")
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    stop = [t for t in (tok.token_to_id("</s>"),) if t is not None]
    out = generate(model, ids, mask, max_new_tokens=8, stop_token_ids=stop, pad_token_id=0)
    ok = {"mc": [], "oe": []}
    for k, row, g in zip(kinds, out.token_lists(), gold):
        text = tok.decode([int(t) for t in row if t not in stop]).strip()
        ok[k].append(text == g)
    return {f"text_{k}": round(100 * float(np.mean(v)), 1) for k, v in ok.items() if v}


def probe_generic(build: Build, stage: str, model, tok_path: Path, bench_dir: Path, folder: str) -> None:
    """Record `bench_probe` on the generic probe bench as `stage`'s probe (once)."""
    from demo import base_data as B

    if "probe" not in build.state["stages"][stage]:
        build.state["stages"][stage]["probe"] = bench_probe(model, tok_path, bench_dir, build.out / "probe_eval" / folder,
                                                            prompts=B.generic_prompts())
        build._write()


def bench_probe(model, tok_path: Path, bench_dir: Path, out_dir: Path, prompts=None) -> dict[str, float]:
    from eval.bench import load_bench
    from eval.judge import RuleJudge
    from eval.predictions import score_predictions
    from eval.prompts import DEFAULT_PROMPTS
    from eval.runner import run_bench
    from instit_jax.loading import load_tokenizer

    tok = load_tokenizer(tok_path)
    bench = load_bench(bench_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = run_bench(model, tok, bench, prompts=prompts or DEFAULT_PROMPTS, batch_size=16,
                      out_path=out_dir / "predictions.jsonl", max_new_tokens=16, data_parallel=False)
    ev = score_predictions(preds, bench=bench, mode="strict", judge=RuleJudge())
    return {k: round(float(v["accuracy"]), 1) for k, v in ev.summaries.items() if v}


# ----------------------------------------------------------------------------------------------- export


def export(build: Build, model, tok_path: Path, dest: Path) -> dict[str, Any]:
    """Write the llava-hf folder: config.json, model.safetensors, tokenizer, processor configs, card."""
    from instit_jax.convert.hf_config import to_llava_hf
    from instit_jax.convert.hf_weights import save_hf_weights

    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*"):
        if old.is_file():
            old.unlink()
    cfg = to_llava_hf(model.cfg)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_hf_weights(model, dest)
    shutil.copy(tok_path, dest / "tokenizer.json")
    write_processor_files(dest, model.cfg)
    weights = dest / "model.safetensors"
    return {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "bytes": weights.stat().st_size}


def write_processor_files(dest: Path, cfg) -> None:
    """tokenizer_config.json, preprocessor_config.json and processor_config.json for transformers."""
    from instit_jax.chat_template import IMAGE_TOKEN
    from instit_jax.processing import CLIP_MEAN, CLIP_STD

    side = cfg.vision.image_size
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "image_token": IMAGE_TOKEN, "model_max_length": 1024,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN}, "padding_side": "left"}, indent=2) + "\n")
    (dest / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
        "do_resize": True, "size": {"shortest_edge": side}, "do_center_crop": True,
        "crop_size": {"height": side, "width": side}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_convert_rgb": True, "do_pad": True, "resample": 3,
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints]}, indent=2) + "\n")
    (dest / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaNextProcessor", "patch_size": cfg.vision.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "num_additional_image_tokens": 1}, indent=2) + "\n")


def write_card(dest: Path, info: dict[str, Any], command: str) -> Path:
    """demo/base/README.md: how the base was built, what it holds, and how it scores."""
    st = info["stages"]
    rows = []
    for name in STAGE_ORDER[1:]:
        s = st.get(name, {})
        seen = s.get("images", s.get("samples", s.get("records", f"{s['rows']} packed rows" if "rows" in s else "-")))
        mark = "*" if s.get("inherited") else ""
        rows.append(f"| {name}{mark} | {s.get('steps', '-')} | {s.get('batch', '-')} | {seen} | {s.get('wall_s', '-')} | "
                    f"{json.dumps(s.get('probe', {}))} |")
    origin = info.get("started_from")
    inherited = [k for k, v in st.items() if v.get("inherited")]
    earlier = f", itself continued from the build of commit `{origin['from']['commit']}`" if origin and origin.get("from") else ""
    origin_line = (f"\n- Sittings: the stages marked * were run by the build of commit `{origin['commit']}` (its base, "
                   f"sha256 `{origin['sha256'][:16]}...`, is where this build continued with `--start-from`{earlier}); "
                   "the same command without `--start-from` runs every stage from random init"
                   if origin and inherited else "")
    md = f"""# instit-demo base: a tiny LLaVA-NeXT for the synthetic shape world

A llava-hf checkpoint (`LlavaNextForConditionalGeneration`, CLIP-style tower + Llama decoder) built from
random init on this repository's synthetic world, in the stages of the real lineage: a "CLIP" tower on
dense per-patch labels (then on printed labels, digits centred in a patch cell), an "LLM" on text-only
reading and multiple choice, LLaVA projector alignment on captions, and generic visual instruction
tuning on UNMARKED media (last on packed rows, the demo's SFT recipe, with a patch-to-word loss that pulls
each labelled visual token toward the decoder's embeddings of the words naming it). It has never seen a Set-of-Marks
frame or a question that names an instance by an ID: `instit-demo` adds that with Inst-IT continuous SFT.

- Build: `{command}` (recipe `configs/demo_base.py`, code `demo/build_base.py`, `demo/base_data.py`)
- Commit: `{info.get('commit', 'unknown')}`; seed {info.get('seed', 0)}; deterministic on one machine{origin_line}
- Wall time: {info['total_s'] / 60:.0f} min on a 2-core CPU (sum of the stages below, data included)
- Parameters: {info['parameters']:,} ({info['bytes'] / 2**20:.1f} MiB f32 safetensors)
- `model.safetensors` sha256: `{info['sha256']}`
- Tokenizer: byte-level BPE, {info['vocab_size']} tokens, trained by the build (`tokenizer.json`)
- `build.json`: the machine-readable record of the stages below (what `--start-from` reads)

| stage | steps | batch | images / samples seen | wall (s) | probe (held out, %) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Probes: `tower`, `tower_digits`, `tower_labels` = per-patch accuracy on held-out scenes (attributes on instance patches, digits on digit
patches, count on the class token, `label` = the digit on each patch of held-out label canvases);
`text` = greedy answers to held-out text-only reading (MC letter, OE exact); `instruct`, `reinstruct`, `bind`,
`drill`, `ground` = the generic held-out bench (unmarked media, generic questions, strict scoring). The marked
Inst-It-style bench scores of this base are row (a) of `instit-demo`'s table.
{lone_block(st)}"""
    path = dest / "README.md"
    path.write_text(md)
    return path


def lone_block(stages: dict[str, Any]) -> str:
    """The card's lines for the last stage's `lone` probe (`demo.mark_probe.lone_reading`), if recorded."""
    lone = next((v["lone"] for k in reversed(STAGE_ORDER) if "lone" in (v := stages.get(k, {}))), None)
    if not lone:
        return ""
    rows = "\n".join(f"| {k} | {100 * r['answer_accuracy']:.0f} | {r['variance_share']:.3f} | {100 * r['probe']:.0f} |"
                     for k, r in lone.items())
    return f"""
Reading a lone unmarked instance (`python -m demo.mark_probe --lone 120`): the base's open-ended answer, the share
of its visual tokens' variance that the attribute explains, and a linear probe on those tokens:

| attribute | answers (%) | variance share | linear probe (%) |
|---|---|---|---|
{rows}
"""


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------- main


def run(out: str | Path, *, hours: float = NOMINAL_HOURS, seed: int = 0, ship: str | Path | None = None,
        start_from: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) every stage in `out`; with `ship`, also write the llava-hf base folder there.

    `start_from`: a shipped base folder (with its `build.json`) whose recorded stages count as done here:
    the build continues from its weights with the stages it has not run (same seed and --hours)."""
    from demo import base_data as B
    from instit_jax.loading import load_pretrained

    out = Path(out).resolve()
    build = Build(out, seed, round(hours / NOMINAL_HOURS, 4))
    t_all = time.time()
    if start_from is not None:
        adopt_base(build, Path(start_from))
    tok_path = build_tokenizer(build)

    text = build_records(build, "text", lambda root: _dump(root / "text.json", B.text_reading_conversations(
        seed + 1, build.size("text"), turns=5)))
    caps = build_records(build, "captions", lambda root: B.write_caption_set(
        root, seed + 2, images=build.size("captions_images"), videos=build.size("captions_videos")))
    probe_bench = out / "probe_bench"
    if not (probe_bench / "video_open_ended.json").exists():
        B.write_generic_bench(probe_bench, seed + 9_000_000, **PROBE)
    lookup = build_records(build, "lookup", lambda root: _dump(root / "lookup.json", B.option_lookup_conversations(
        seed + 5, build.size("lookup"), turns=LOOKUP_TURNS)))
    gen2 = build_records(build, "generic_labels", lambda root: B.write_generic_set(
        root, seed + 4, images=build.size("generic2_images"), videos=build.size("generic2_videos"),
        digits=0, labels=build.size("generic2_labels"), turns=5))
    bind = build_records(build, "label_lookup", lambda root: B.write_label_lookup_set(
        root, seed + 6, count=build.size("label_lookup")))
    def through_instruct():
        run_tower(build, tok_path, "tower")
        model = run_tower(build, tok_path, "tower_digits", after="tower")
        model = run_trainer_stage(build, "text", tok_path, model, {"text": (str(text), 1.0)}, **TEXT_ONLY)
        if "probe" not in build.state["stages"]["text"]:
            build.state["stages"]["text"]["probe"] = text_probe(model, tok_path, seed)
            build._write()
        model = run_trainer_stage(build, "align", tok_path, model, {"captions": (str(caps), 1.0)})
        gen = build_records(build, "generic", lambda root: B.write_generic_set(
            root, seed + 3, images=build.size("generic_images"), videos=build.size("generic_videos"),
            digits=build.size("generic_digits"), turns=5))
        model = run_trainer_stage(build, "instruct", tok_path, model,
                                  {"generic": (str(gen), 3.0), "captions": (str(caps), 0.3), "text": (str(text), 0.3)})
        probe_generic(build, "instruct", model, tok_path, probe_bench, "generic")
        return model

    def through_bind(model):
        # Reading printed labels (digits centred in a patch cell), then generic visual instruction tuning again on
        # the new tower, with text-only option-lookup turns in the mix; then finding printed labels by digit.
        model = run_tower(build, tok_path, "tower_labels", init_model=model)
        model = run_trainer_stage(build, "reinstruct", tok_path, model,
                                  {"generic": (str(gen2), 3.0), "captions": (str(caps), 0.2), "text": (str(text), 0.3),
                                   "lookup": (str(lookup), 0.5)})
        probe_generic(build, "reinstruct", model, tok_path, probe_bench, "reinstruct")
        model = run_trainer_stage(build, "bind", tok_path, model,
                                  {"labels": (str(bind), 2.0), "generic": (str(gen2), 1.0), "text": (str(text), 0.2),
                                   "lookup": (str(lookup), 0.3)})
        probe_generic(build, "bind", model, tok_path, probe_bench, "bind")
        return model

    # Go on from the last stage with an output here (a base adopted with --start-from has only its last one).
    if build.done("drill"):
        model = None  # the output of the last stage done is what its runner loads below
    elif build.done("bind"):
        model = load_pretrained(str(out / "bind"))
    elif build.done("instruct"):
        model = through_bind(load_pretrained(str(out / "instruct")))
    else:
        model = through_bind(through_instruct())
    # Generic instruction tuning on packed rows: many more conversations per step.
    generic = {"generic": (str(gen2), 1.0), "lookup": (str(lookup), 0.2)}
    if not build.done("ground"):
        model = run_trainer_stage(build, "drill", tok_path, model, generic)
        probe_generic(build, "drill", model, tok_path, probe_bench, "drill")
    # The same diet with the patch-to-word loss: visual tokens that name what they show.
    model = run_ground(build, "ground", tok_path, model, generic)
    probe_generic(build, "ground", model, tok_path, probe_bench, "ground")
    if "lone" not in build.state["stages"]["ground"]:
        from demo.mark_probe import lone_reading

        build.state["stages"]["ground"]["lone"] = lone_reading(model, tokenizer=tok_path)
        build._write()
    stages = build.state["stages"]  # wall time of the whole build, over every sitting that made it
    info: dict[str, Any] = {"total_s": round(sum(s["wall_s"] for s in stages.values()), 1), "stages": stages,
                            "this_sitting_s": round(time.time() - t_all, 1)}
    if "started_from" in build.state:
        info["started_from"] = build.state["started_from"]
    if ship is not None:
        info.update(export(build, model, tok_path, Path(ship)))
        info.update(parameters=int(sum(np.size(x) for x in _leaves(model))), commit=git_commit(), seed=seed,
                    vocab_size=build.state["stages"]["tokenizer"]["vocab_size"])
        command = f"instit-demo build-base --out BUILD_DIR --hours {hours:g} --seed {seed} --ship demo/base"
        (Path(ship) / "build.json").write_text(json.dumps({"settings": build.state["settings"], "stages": stages,
                                                           "started_from": build.state.get("started_from"),
                                                           "sha256": info["sha256"], "commit": info["commit"]},
                                                          indent=1) + "\n")
        write_card(Path(ship), info, command)
    return info


TEXT_ONLY = {"data.images_per_batch": False, "data.videos_per_batch": False}
LOOKUP_TURNS = 4  # MC turns per option-lookup conversation (~230 tokens: the 256-token bucket)


def adopt_base(build: Build, base: Path) -> None:
    """Count the stages recorded in `base/build.json` as done in `build`, from `base`'s weights.

    The base's weights become the output of its last recorded stage (one of `ADOPTABLE`), its tokenizer the
    build's, so `run` continues with the stages the base has not run. Refused when the weights are not the
    ones that `build.json` records, or the base was built with other settings."""
    from instit_jax.loading import load_pretrained, save_pretrained

    rec_path = base / "build.json"
    if not rec_path.is_file():
        raise SystemExit(f"{base}: no build.json (the record of the stages that made this base)")
    rec = json.loads(rec_path.read_text())
    sha = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    if sha != rec.get("sha256"):
        raise SystemExit(f"{base}/model.safetensors: sha256 {sha} is not the one build.json records "
                         f"({rec.get('sha256')})")
    if rec.get("settings") != build.state["settings"]:
        raise SystemExit(f"{rec_path}: built with {rec.get('settings')}, this build asks {build.state['settings']}")
    stages = build.state.setdefault("stages", {})
    if "started_from" in build.state:
        return
    last = [k for k in ADOPTABLE if k in rec["stages"]]
    if not last or set(rec["stages"]) - set(STAGE_ORDER[:STAGE_ORDER.index(last[-1]) + 1]):
        raise SystemExit(f"{rec_path}: its stages ({sorted(rec['stages'])}) do not end at one of {ADOPTABLE}; start "
                         "from another base or build from scratch")
    shutil.copy(base / "tokenizer.json", build.out / "tokenizer.json")
    save_pretrained(load_pretrained(str(base)), build.out / last[-1])
    for k, v in rec["stages"].items():
        stages[k] = {**v, "inherited": True}
    build.state["started_from"] = {"sha256": sha, "commit": rec.get("commit", "unknown"),
                                   "from": rec.get("started_from")}
    build._write()


ADOPTABLE = ("instruct", "bind", "drill", "ground")  # stages whose output `run` can load to go on from
STAGE_ORDER = ("tokenizer", "tower", "tower_digits", "data_text", "text", "data_captions", "align", "data_generic",
               "instruct", "tower_labels", "data_lookup", "data_generic_labels", "reinstruct", "data_label_lookup",
               "bind", "drill", "ground")


def _leaves(model):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="instit-demo build-base", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="build directory (checkpoints, data, probes; resumable)")
    p.add_argument("--hours", type=float, default=NOMINAL_HOURS,
                   help=f"scale every stage from the recipe's nominal {NOMINAL_HOURS} h on a 2-core machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ship", help="also write the llava-hf base folder here (e.g. demo/base)")
    p.add_argument("--start-from", help="a shipped base folder (with build.json): its stages count as done")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    info = run(a.out, hours=a.hours, seed=a.seed, ship=a.ship, start_from=a.start_from)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
