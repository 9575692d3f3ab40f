"""`python -m demo.mark_probe`: what a base's visual tokens say about Set-of-Marks frames, before any SFT.

Inst-IT SFT can only bind "[2]" to an instance if the tokens the decoder sees carry the label's digit and
the instance's attributes. This probe renders held-out scenes of the demo world (2-4 instances), marked
in the chosen look, runs the base's tower + projector on one 84 px view, and fits linear probes
(softmax regression on 70% of the patches, accuracy on the other 30%) for:

- the digit of each label, read at the patch that holds the label;
- the colour of the labelled instance, read at that same patch (one attention hop for the decoder);
- the colour of an instance at every patch it covers, on the marked frame and on the same frame unmarked.

`--look full` draws marks as the reference does (mask tint + ID-coloured contour + numeric label);
`--look labels` draws the numeric labels only (`demo.world.MASK_MARKS = False`, the demo world's look).

Measured on the shipped base (`--scenes 600`, ~10 seconds): full marks: digit 0.79, colour at the label
patch 0.60, colour at instance patches 0.62 marked vs 0.98 unmarked; labels only: digit 0.79, colour at
the label patch 0.87, colour at instance patches 0.97 vs 0.98. The tint and contours recolour small
objects past what the base learned to read; labels alone leave the instances readable.

`--label-questions N` asks the base instead about N held-out printed-label canvases (no instance, no mark):
the number at a place, the place of a number, the box of a number, whether a number is there. The shipped
base, N=60: read 0.44, where 0.12 (9 places), box 0.00 (dark / light), present 0.50 (72-221 questions each).

`--lone N`: the base's open-ended answers about the only instance of N unmarked scenes, beside the share of
the visual tokens' variance each attribute explains. The shipped base, N=120: colour 1.00 (variance share
0.37), shape 0.68 (0.25), texture 0.98 (0.25), size 0.95 (0.17). The same base before its patch-to-word
stage answered colour 0.22 with a share of 0.08 (texture 0.47), although a linear probe read colour at 0.94:
what the decoder learns to read is what dominates the tokens' variance.

`--attention`: per decoder head, the attention from the digit of "Is there a d?" to the printed label d,
beside the canvas's other labels. The shipped base: layer 0 head 1 gives the asked label 0.22 per token
against 0.011 for the others (more on it than on the others on 94% of canvases), layer 1 head 2 0.25 vs
0.11: the decoder finds a label by its digit in its first layer.

`--colour-binding SCENES --steps S`: the demo's Inst-IT SFT recipe on SCENES marked scenes asked only "What
colour is [d]?", then held-out scenes; accuracy per instance count beside 1/n, and whether wrong answers name
another instance's colour. The shipped base, 3,000 scenes, 300 steps (~6
minutes): 0.33 held out (2 instances 0.52, 3: 0.35, 4: 0.26 against 0.50 / 0.33 / 0.25), and every wrong
answer names another instance's colour: the model learns "a colour in the image", not the instance's.
Although the label is found in the first layer and colours are read off instance patches, the colour does
not travel through the label's token. Neither memorisation nor the conversation's order explains it: 20,000
scenes seen about once each (400 steps) also give 0.33 (training loss 0.18: later turns name the colours
the conversation has not named yet), and `--one-question` (one conversation per label, no such shortcut)
gives 0.33 after 300 steps on 3,000 scenes (training loss flat at 0.65-0.8, the cost of naming one of the
image's colours) and 0.38 after 1,200 steps on 12,000 scenes (2 instances 0.67, 3: 0.39, 4: 0.27; ~20
minutes): binding only begins after about twenty times the demo's whole SFT budget.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

LOOKS = ("full", "labels")


def marked_scenes(count: int, look: str, seed: int = 99) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """`count` held-out demo-world scenes: (marked image, unmarked image, {"labels": [(digit, patch,
    colour index)], "owner": [(patch, colour index)]})."""
    from data_gen.som import render_marks
    from data_gen.synthetic import mark_look
    from data_gen.synthetic_scene import COLOURS, Difficulty
    from demo import base_data as B
    from demo import world as W

    if look not in LOOKS:
        raise ValueError(f"look must be one of {LOOKS}, got {look!r}")
    colours = list(COLOURS)
    out = []
    for k in range(count):
        rng = np.random.default_rng([seed, k])
        scene, frames = B.sample_scene(rng, Difficulty(2, 4))
        img, masks = frames[0]
        style = mark_look("image", int(rng.integers(1 << 30)), W.MARK_LABEL_BOX, W.LABEL_GRID, look == "full")
        marked, infos = render_marks(img, list(masks.items()), "image", mark_style=style, return_info=True)
        colour_of = {t.iid: colours.index(t.colours[0]) for t in scene.tracks}
        labels = [(int(i.id), (i.label_xy[1] // W.PATCH) * W.GRID + i.label_xy[0] // W.PATCH, colour_of[int(i.id)])
                  for i in infos if i.skipped is None and i.label_xy is not None]
        owner = [(p, colour_of[int(o)]) for p, o in enumerate(B.patch_owner(masks)) if o]
        out.append((marked, img, {"labels": labels, "owner": owner}))
    return out


def visual_tokens(model, images: list[np.ndarray], batch: int = 64) -> np.ndarray:
    """[N, P, D] projected tile features of 84 px images (one view each, as the base's base tile)."""
    import jax
    import jax.numpy as jnp

    from instit_jax.processing import CLIP_MEAN, CLIP_STD  # the base's preprocessor_config.json

    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    fn = jax.jit(model.image_features)
    outs = []
    for i in range(0, len(images), batch):
        x = (np.stack(images[i:i + batch]).astype(np.float32) / 255.0 - mean) / std
        outs.append(np.asarray(fn(jnp.asarray(x))))
    return np.concatenate(outs)


def linear_probe(x: np.ndarray, y: np.ndarray, steps: int = 500, lr: float = 0.5) -> tuple[float, float]:
    """(held-out accuracy, majority-class accuracy): softmax regression fitted on the first 70% of rows."""
    import jax
    import jax.numpy as jnp

    x = np.asarray(x, np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = np.asarray(y, np.int32)
    train = np.arange(len(y)) < int(0.7 * len(y))
    classes = int(y.max()) + 1

    def loss(p, x, y):
        logits = x @ p[0] + p[1]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]) + 1e-3 * jnp.sum(p[0] ** 2)

    grad = jax.jit(jax.grad(loss))
    p = (jnp.zeros((x.shape[1], classes)), jnp.zeros(classes))
    xt, yt = jnp.asarray(x[train]), jnp.asarray(y[train])
    for _ in range(steps):
        g = grad(p, xt, yt)
        p = (p[0] - lr * g[0], p[1] - lr * g[1])
    pred = np.asarray(x[~train] @ np.asarray(p[0]) + np.asarray(p[1])).argmax(1)
    held = y[~train]
    return float((pred == held).mean()), float(np.bincount(held).max() / len(held))


def run(base: str | Path, scenes: int, look: str) -> dict[str, dict[str, float]]:
    from instit_jax.loading import load_pretrained

    model = load_pretrained(base)
    data = marked_scenes(scenes, look)
    marked = visual_tokens(model, [d[0] for d in data])
    plain = visual_tokens(model, [d[1] for d in data])
    rows: dict[str, tuple[list, list]] = {k: ([], []) for k in (
        "digit_at_label", "colour_at_label", "colour_marked", "colour_unmarked")}
    for k, (_, _, meta) in enumerate(data):
        for digit, p, colour in meta["labels"]:
            rows["digit_at_label"][0].append(marked[k, p])
            rows["digit_at_label"][1].append(digit)
            rows["colour_at_label"][0].append(marked[k, p])
            rows["colour_at_label"][1].append(colour)
        for p, colour in meta["owner"]:
            rows["colour_marked"][0].append(marked[k, p])
            rows["colour_marked"][1].append(colour)
            rows["colour_unmarked"][0].append(plain[k, p])
            rows["colour_unmarked"][1].append(colour)
    result = {}
    for name, (x, y) in rows.items():
        acc, majority = linear_probe(np.stack(x), np.array(y))
        result[name] = {"accuracy": round(acc, 3), "majority": round(majority, 3), "n": len(y)}
    return result


def label_questions(base: str | Path, canvases: int, seed: int = 4242) -> dict[str, dict[str, float]]:
    """Greedy answers of `base` to held-out printed-label questions (`base_data.label_lookup_questions` on
    label canvases; those with 2-3 labels are asked, in the bench's open-ended layout), exact match per kind: `read` (the number
    at a place), `where` (the place of a number), `box` (the box look of a number), `present` (is there a d):
    the find-a-label-by-its-digit step that binding an `[ID]` needs, asked without any instance."""
    from demo import base_data as B
    from instit_jax.assistant import Assistant

    assistant = Assistant.from_pretrained(str(base))
    hits: dict[str, list[bool]] = {"read": [], "where": [], "box": [], "present": []}
    for k in range(canvases):
        rng = np.random.default_rng([seed, k])
        img, placed = B.label_canvas(rng, looks=True)
        if len(placed) < 2:
            continue
        for q in B.label_lookup_questions(placed):
            text = q["question"]
            kind = ("box" if "box" in text else "where" if text.startswith("Where") else
                    "present" if text.startswith("Is there") else "read")
            prompt, gold = B.oe_turn(q, "image", True)
            got = assistant.answer(prompt, image=img, max_new_tokens=8).text
            hits[kind].append(got.strip().lower() == gold.lower())
    return {kind: {"accuracy": round(float(np.mean(v)), 3), "n": len(v)} for kind, v in hits.items() if v}


def lone_reading(base, scenes: int = 120, seed: int = 31337, tokenizer: str | Path | None = None
                 ) -> dict[str, dict[str, float]]:
    """What the decoder reads off one unmarked instance, beside what the visual tokens hold.

    On `scenes` held-out one-instance scenes: the base's open-ended answer to "What colour / shape / texture
    / size ... the only shape" (exact match), and per attribute the share of the variance of the RMS-normalised
    visual tokens on the instance's patches that the attribute explains (between-class / total: what the
    decoder's first RMSNorm passes on), with the held-out linear-probe accuracy on the same tokens.
    `base`: a base folder, or a loaded model (then `tokenizer` is its tokenizer.json)."""
    from data_gen.synthetic_scene import COLOURS, SHAPES, SIZES, TEXTURES, Difficulty
    from demo import base_data as B
    from instit_jax.assistant import Assistant

    if isinstance(base, (str, Path)):
        assistant = Assistant.from_pretrained(str(base), tokenizer=None if tokenizer is None else str(tokenizer))
    else:
        from instit_jax.loading import load_tokenizer

        assistant = Assistant(base, load_tokenizer(tokenizer))
    asks = {"colour": ("What colour is the only shape?", lambda tr: tr.colours[0], list(COLOURS)),
            "shape": ("What shape is the only shape?", lambda tr: tr.shape, list(SHAPES)),
            "texture": ("What texture does the only shape have?", lambda tr: tr.texture, list(TEXTURES)),
            "size": ("How big is the only shape?", lambda tr: tr.size, list(SIZES))}
    hits: dict[str, list[bool]] = {k: [] for k in asks}
    images, patches, classes = [], [], []
    for k in range(scenes):
        scene, frames = B.sample_scene(np.random.default_rng([seed, k]), Difficulty(1, 1))
        img, masks = frames[0]
        tr = scene.tracks[0]
        for name, (question, gold, _) in asks.items():
            text, answer = B.oe_turn({"question": question, "answer": gold(tr)}, "image", True)
            hits[name].append(assistant.answer(text, image=img, max_new_tokens=4).text.strip() == answer)
        images.append(img)
        patches.append([p for p, owner in enumerate(B.patch_owner(masks)) if owner])
        classes.append([values.index(gold(tr)) for _, gold, values in asks.values()])
    tokens = visual_tokens(assistant.model, images)
    x = np.concatenate([tokens[k, ps] for k, ps in enumerate(patches)])
    y = np.concatenate([np.tile(classes[k], (len(ps), 1)) for k, ps in enumerate(patches)])
    x = x / np.sqrt(np.mean(x**2, axis=1, keepdims=True))
    centred = x - x.mean(0)
    total = float(np.sum(centred**2))
    out = {}
    for i, name in enumerate(asks):
        between = sum(float(np.sum(centred[y[:, i] == c].mean(0) ** 2)) * int(np.sum(y[:, i] == c))
                      for c in np.unique(y[:, i]))
        probe, _ = linear_probe(x, y[:, i])
        out[name] = {"answer_accuracy": round(float(np.mean(hits[name])), 2),
                     "variance_share": round(between / total, 3), "probe": round(probe, 2)}
    return out


def label_attention(base: str | Path, canvases: int = 40, seed: int = 4242) -> dict[str, dict[str, float]]:
    """Per decoder layer and head: the attention from the digit of "Is there a d?" to the two image tokens
    (base view and tile) of the printed label d, beside its mean over the tokens of the canvas's other labels
    (held-out label canvases with 2-3 distinct labels, the layers run one by one on the prompt).

    {"L<layer>H<head>": {"match", "other" (attention per token), "wins" (share of canvases where the
    matching label gets more than the others)}}."""
    import jax
    import jax.numpy as jnp

    from demo import base_data as B
    from demo import world as W
    from instit_jax.assistant import Assistant
    from instit_jax.models.llm import apply_rope, rope_tables

    assistant = Assistant.from_pretrained(str(base))
    model, tok = assistant.model, assistant.tokenizer
    lm = model.language_model
    per_view = model.tokens_per_tile

    def tokens_of(visual_index: np.ndarray, x: int, y: int) -> list[int]:
        """Prompt positions showing the patch at (x, y): its row in the base view and in the tile."""
        patch = (y // W.PATCH) * W.GRID + x // W.PATCH
        return np.flatnonzero(np.isin(visual_index, (patch, per_view + patch))).tolist()

    rows: dict[str, list[tuple[float, float]]] = {}
    for k in range(canvases):
        img, placed = B.label_canvas(np.random.default_rng([seed, k]), looks=True)
        digits = [p[0] for p in placed]
        if len(placed) < 2 or len(set(digits)) < len(digits):
            continue
        digit, x0, y0, _ = placed[0]
        inp = assistant.prepare(f"Is there a {digit}?", image=img)
        ids = inp["ids"]
        image_pos = np.flatnonzero(ids[0] == model.cfg.image_token_id)
        query = max(i for i in range(image_pos[-1] + 1, ids.shape[1])
                    if tok.id_to_token(int(ids[0, i])) in (digit, "Ġ" + digit))
        match = tokens_of(inp["visual_index"][0], x0, y0)
        others = [i for _, x, y, _ in placed[1:] for i in tokens_of(inp["visual_index"][0], x, y)]
        x = model.embed_inputs(jnp.asarray(ids), jnp.asarray(inp["pixels"]), None, jnp.asarray(inp["visual_index"]))
        t = ids.shape[1]
        cos, sin = rope_tables(jnp.arange(t)[None], lm.cfg.resolved_head_dim, lm.cfg.rope_theta)
        for li, layer in enumerate(lm.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q = apply_rope(att.q_proj(h).reshape(1, t, att.num_heads, att.head_dim), cos, sin)
            kk = apply_rope(att.k_proj(h).reshape(1, t, att.num_kv_heads, att.head_dim), cos, sin)
            kk = jnp.repeat(kk, att.num_heads // att.num_kv_heads, axis=2)
            scores = jnp.einsum("hd,khd->hk", q[0, query], kk[0, :query + 1]) * att.head_dim ** -0.5
            probs = np.asarray(jax.nn.softmax(scores, axis=-1))
            for head in range(att.num_heads):
                rows.setdefault(f"L{li}H{head}", []).append((probs[head, match].mean(), probs[head, others].mean()))
            x, _ = layer(x, cos, sin, jnp.ones((1, t), jnp.int32))
    out = {}
    for name, v in rows.items():
        a = np.asarray(v)
        out[name] = {"match": round(float(a[:, 0].mean()), 4), "other": round(float(a[:, 1].mean()), 4),
                     "wins": round(float((a[:, 0] > a[:, 1]).mean()), 2)}
    return out


def colour_binding(base: str | Path, workdir: str | Path, scenes: int, steps: int, held_out: int = 80,
                   one_question: bool = False) -> dict[str, object]:
    """SFT `base` with the demo's Inst-IT recipe on `scenes` marked scenes (labels only) asked only "What
    colour is [d]?" (open-ended, every label of a scene in one conversation; with `one_question`, one
    conversation per label, so no answer can be had by naming a colour the conversation has not named yet),
    then ask held-out scenes.

    Returns accuracy per number of instances beside its baseline 1/n (naming the colour of one of the n
    instances at random), and how the wrong answers split: another instance's colour, or one not in the
    image. Answers that always name a present colour at about 1/n mean the model reads the scene's colours
    but has not bound the ID to its instance."""
    import jax
    from PIL import Image

    from data_gen.synthetic_scene import COLOURS
    from demo import base_data as B
    from demo.run import sft_config
    from instit_jax.assistant import Assistant
    from instit_jax.data.build import build
    from instit_jax.loading import load_pretrained, load_tokenizer
    from instit_jax.sharding import make_mesh
    from instit_jax.train import train

    colours = list(COLOURS)
    wd = Path(workdir).resolve()
    (wd / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for k, (marked, _, meta) in enumerate(marked_scenes(scenes, "labels", seed=555)):
        Image.fromarray(marked).save(wd / "img" / f"{k}.png")
        turns = []  # (human, gpt) pairs; a conversation's first turn carries the image and the instruction
        for i, (digit, _, colour) in enumerate(meta["labels"]):
            first = one_question or i == 0
            text, answer = B.oe_turn({"question": f"What colour is [{digit}]?", "answer": colours[colour]}, "image",
                                     first)
            turns.append([{"from": "human", "value": f"<image>\n{text}" if first else text},
                          {"from": "gpt", "value": answer}])
        convs = turns if one_question else [[t for pair in turns for t in pair]]
        recs += [{"id": f"bind-{k}-{j}", "image": f"img/{k}.png", "conversations": conv} for j, conv in enumerate(convs)]
    (wd / "train.json").write_text(json.dumps(recs))
    build([str(wd / "train.json")], str(wd), str(wd / "records"), 2)
    base = Path(base).resolve()
    config = sft_config("colour_binding", base, {"bind": (str(wd / "records"), 1.0)}, steps, 1)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    result = train(config, str(wd / "sft"), model=load_pretrained(base), mesh=mesh)
    model = result.model()
    assistant = Assistant(model, load_tokenizer(base))
    by_n: dict[int, list[bool]] = {}
    wrong = {"another_instance": 0, "not_in_image": 0}
    for marked, _, meta in marked_scenes(held_out, "labels"):  # the probe's held-out seed, not the SFT's
        present = {c for _, c in meta["owner"]}
        for digit, _, colour in meta["labels"]:
            text, answer = B.oe_turn({"question": f"What colour is [{digit}]?", "answer": colours[colour]}, "image",
                                     True)
            got = assistant.answer(text, image=marked, max_new_tokens=4).text.strip()
            by_n.setdefault(len(meta["labels"]), []).append(got == answer)
            if got != answer:
                wrong["another_instance" if got in colours and colours.index(got) in present else "not_in_image"] += 1
    loss = [r["loss"] for r in result.history if "loss" in r]
    return {"scenes": scenes, "steps": steps, "conversations": len(recs), "final_train_loss": round(float(loss[-1]), 3),
            "accuracy": round(float(np.mean([h for v in by_n.values() for h in v])), 3),
            "by_instances": {n: {"accuracy": round(float(np.mean(v)), 2), "baseline": round(1 / n, 2), "n": len(v)}
                             for n, v in sorted(by_n.items())}, "wrong": wrong}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=str(Path(__file__).resolve().parent / "base"))
    ap.add_argument("--scenes", type=int, default=600)
    ap.add_argument("--look", choices=LOOKS, default="labels")
    ap.add_argument("--label-questions", type=int, default=0, metavar="N",
                    help="instead: ask the base about N held-out printed-label canvases (no instance, no mark)")
    ap.add_argument("--attention", action="store_true",
                    help="instead: per decoder head, attention from a question's digit to that printed label")
    ap.add_argument("--colour-binding", type=int, default=0, metavar="SCENES",
                    help="instead: SFT the base on SCENES marked scenes asked the colour of each [ID], then "
                         "ask held-out scenes (with --steps, --workdir)")
    ap.add_argument("--one-question", action="store_true",
                    help="with --colour-binding: one question per conversation instead of every label in one")
    ap.add_argument("--lone", type=int, default=0, metavar="SCENES",
                    help="instead: the base's answers about the only instance of SCENES scenes, beside the "
                         "variance share of each attribute in its visual tokens")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workdir", default="mark_probe_binding")
    args = ap.parse_args(argv)
    if args.lone:
        for name, r in lone_reading(args.base, args.lone).items():
            print(f"{name:8s} answers {r['answer_accuracy']:.2f}  variance share {r['variance_share']:.3f}  "
                  f"probe {r['probe']:.2f}")
        return
    if args.attention:
        for name, r in label_attention(args.base).items():
            print(f"{name}  match {r['match']:.4f}  other {r['other']:.4f}  wins {r['wins']:.2f}")
        return
    if args.colour_binding:
        print(json.dumps({"probe": "colour_binding", "base": args.base,
                          **colour_binding(args.base, args.workdir, args.colour_binding, args.steps,
                                            one_question=args.one_question)}))
        return
    if args.label_questions:
        result = label_questions(args.base, args.label_questions)
        for kind, r in result.items():
            print(f"{kind:8s} {r['accuracy']:.3f}  ({r['n']} questions)")
        print(json.dumps({"probe": "label_questions", "base": args.base, **result}))
        return
    result = run(args.base, args.scenes, args.look)
    for name, r in result.items():
        print(f"{name:18s} held-out {r['accuracy']:.3f}  (majority {r['majority']:.3f}, {r['n']} patches)")
    print(json.dumps({"probe": "mark_probe", "look": args.look, "base": args.base, **result}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
