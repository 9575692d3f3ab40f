"""`python -m demo.lookup_probe`: how fast the demo decoder learns multiple-choice option lookup.

Every MC question needs one text-only skill: find the option that holds the answer and reply with its
letter. The demo decoder (configs/demo_base.py: 4 layers x 128, 4 heads, 2 KV heads) has to learn it from
random init in the base's "LLM" stage, and this is a long plateau: lookup is a two-step attention circuit
(an option's value is matched with the value named in the question, and the answer position reads the
matched option's letter). This probe trains the decoder alone on lookup rows with the options of
`demo.base_data.LOOKUP_FIELDS`, in one of two layouts:

    short:  <s> A. plain\nB. striped\nC. checked\nD. dotted\nWhich option says striped? B
    bench:  <s> Which option says striped?\nA. plain\nB. striped\nC. checked\nD. dotted\nThe best answer is: B

("bench" is the held-out bench's order: question first, options in letter order, the answer cue; bare, or
with `--chat P` a fraction P of rows in the vicuna chat layout with the bench's instruction), and prints
held-out accuracy on 2-, 3- and 4-option rows of the training layout (bench: its bare form; argmax over the
option letters) and on text MC in the held-out bench's chat layout (`bench_layout`: instruction, question,
4 options, answer cue, vicuna template), so a curriculum can be judged in minutes.

  --layout short|bench     the training rows' layout (above); --chat P: bench rows in the chat layout
  --schedule N:STEPS,...   options per row in each phase (2, 3, 4; 0 = 2-4 at random per row)
  --mask answer|all        loss on the letter only, or on every token of the row (language modelling)
  --init fresh|DIR         a random decoder (seed 0) or the decoder of a llava-hf folder (e.g. demo/base)
  --shuffle-letters P      list a fraction P of training rows' options in a random letter order (the probes
                           keep A, B, C, D order)
  --width/--heads/--kv-heads/--layers  shape of the fresh decoder (default: the recipe's 128 / 4 / 2 / 4;
                           the init scale follows the width, the MLP is 3x wide)

Measured on the 2-core CI-like box (AdamW, constant lr after 20 warmup steps; batch 192 x 40 tokens unless
stated; two runs sharing the box at ~2 s/step each, one alone at ~1 s/step). Where the curriculum escapes
the plateau varies with the data seed, so compare curricula on more than one seed:
- The bench's order is what the decoder learns: `--layout bench --schedule 0:1250 --batch 128 --lr 1e-3`
  (bare rows, 2-4 options, loss on every token), fresh, alone on the box at ~0.72 s/step: 4-option 26.2% at
  step 500, 33.2% at 750, 86.7% at 1000 and 98.0% at 1250 (2-option 99.6%); escaped within 160k rows,
  ~15 minutes. The chat-layout probe stays at chance (25.0%) without chat rows; a scratch run that
  continued such a decoder on half bare, half chat rows (batch 64) had it at 89.1% after 100 steps.
  From the shipped base's decoder (`--init demo/base`, same flags, `--schedule 0:1000`, sharing the box):
  4-option 28.9% at 250, 26.6% at 500, 46.1% at 750, 82.0% at 1000 (2-option 99.2%): no faster than fresh.
- `--schedule 2:500,4:500 --mask all --lr 3e-3`, fresh: 2-option 61% at step 250, 90.6% at 500 (a 2-option
  shortcut: on switching to 4 options the 2-option accuracy drops to ~53%); 4-option ~50% at 650-950, then
  38.7% at 1000 (unstable at this lr). With `--mask answer`: 2-option 51-59% through step 250.
- `--schedule 0:1000 --mask all --lr 3e-3` (2-4 options mixed in every batch), fresh: 4-option 27% at step
  300, 45% at 600, 51.6% at 1000 (2-option 96.5%) with one data seed; 34.4% at 1000, 48.4% at 1400 and
  58.2% at 2100 (3-option 63.3%, 2-option 80.9%) with another (`--seed 0`, this script as it is).
- `--init demo/base --schedule 2:300,4:700 --lr 1e-3`: 2-option 98.8% at 300 (the shipped base's decoder
  starts faster than a fresh one), then 4-option 53.9% after 200 steps of 4 options.
- `--init demo/base --schedule 0:1500 --lr 1e-3 --shuffle-letters 0.5` (no position shortcut can answer the
  shuffled rows): 4-option 23-28% through step 900.
- Rows of 256 tokens in the bench layout (several 4-option MC turns each), same decoder: chance for 100-500
  steps with the letter-only loss or `all`.
- Width and heads, fresh, `--schedule 0:700 --mask all --lr 1e-3 --shuffle-letters 0.5 --batch 128`: at step
  700, 4-option / 2-option accuracy 27.3 / 55.1 (128 wide, 4 heads), 27.7 / 54.3 (128, 8 heads), 29.3 / 56.2
  (`--width 256 --heads 8 --kv-heads 4`, ~2x the step time): a 4x wider decoder does not leave the plateau
  sooner when no position shortcut can answer.
In every short-layout run the bench-layout probe stays at chance (22-27%): the skill of the short rows
(options before the question) does not carry to the bench's order.

What the stated-answer lookup does not give: the base's decoder before its drill stage, trained this way
(1,250 bare bench-order steps of 128 rows, then 150 steps of 64 rows half in the chat layout: 4-option 96.5%,
chat layout 94.5%), then 200 steps of generic visual instruction tuning, answers the generic probe bench's visual MC no better (image MC
31.7 vs 30.8; the letter is right for 43% of the questions it answers right open-ended, 42% before). A
visual question's answer is not in the text, so the option cannot be matched against it. What does give it is
visual MC itself in volume: 400 packed steps of generic instruction tuning (~11k conversations) put that
fraction at 0.66-0.71 and image MC at 43-45, with or without the lookup training above (the base recipe's
"drill" stage, `configs/demo_base.py`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

LETTERS = "ABCD"
LAYOUTS = ("short", "bench")


def parse_schedule(text: str) -> list[tuple[int, int]]:
    """"0:1000" or "2:300,4:700" -> [(options, steps)]; options 0 means 2-4 at random per row."""
    out = []
    for part in text.split(","):
        try:
            n, steps = (int(x) for x in part.split(":"))
        except ValueError:
            raise SystemExit(f"--schedule: {part!r} is not N:STEPS (for example 0:1000 or 2:300,4:700)") from None
        if n not in (0, 2, 3, 4) or steps <= 0:
            raise SystemExit(f"--schedule: {part!r}: N must be 0, 2, 3 or 4 and STEPS > 0")
        out.append((n, steps))
    return out


class LookupRows:
    """Lookup rows and probes for one tokenizer (ids of `<s>`, the option letters and ` A`..` D`)."""

    def __init__(self, tokenizer, length: int = 40, shuffle_letters: float = 0.0, layout: str = "short",
                 chat: float = 0.0):
        from demo.base_data import LOOKUP_FIELDS

        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.tok, self.length, self.shuffle_letters = tokenizer, length, shuffle_letters
        self.layout, self.chat = layout, chat
        self.fields = {k: list(v) for k, v in LOOKUP_FIELDS.items()}
        self.names = list(self.fields)
        self.bos = tokenizer.token_to_id("<s>")
        self.answer_ids = [self.encode(" " + c)[0] for c in LETTERS]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def block(self, rng: np.random.Generator, n: int) -> tuple[str, list[str], int]:
        """(field, n distinct option values, index of the asked one)."""
        field = self.names[int(rng.integers(len(self.names)))]
        vocab = self.fields[field]
        values = [vocab[i] for i in rng.permutation(len(vocab))[:n]]
        return field, values, int(rng.integers(n))

    def row(self, rng: np.random.Generator, n: int, shuffle: float = 0.0) -> tuple[list[int], int]:
        """Token ids of one row ending with the answer letter, and the answer's letter index; with probability
        `shuffle` the options are listed in a random letter order ("C. red\nA. blue"), which only reading
        the letter beside the value can answer."""
        _, values, j = self.block(rng, n)  # values[j] is asked
        letters = list(LETTERS[:n])
        if shuffle and rng.random() < shuffle:
            letters = [letters[i] for i in rng.permutation(n)]
        options = "\n".join(f"{c}. {v}" for c, v in zip(letters, values))
        k = LETTERS.index(letters[j])
        ids = [self.bos, *self.encode(f"{options}\nWhich option says {values[j]}?"), self.answer_ids[k]]
        if len(ids) > self.length:
            raise ValueError(f"lookup row of {len(ids)} tokens exceeds --length {self.length}")
        return ids, k

    def bench_prompt(self, rng: np.random.Generator, n: int, chat: bool) -> tuple[list[int], int]:
        """Token ids of one MC prompt in the bench's order (question, options A.. in letter order, the answer
        cue), in the vicuna chat layout with the bench's instruction (`chat`) or bare; and the answer index."""
        from demo.base_data import MC_POST, MC_PRE, lookup_question
        from instit_jax.chat_template import render_prompt

        field, values, k = self.block(rng, n)
        question = lookup_question(field, values[k], rng)
        options = "\n".join(f"{c}. {v}" for c, v in zip(LETTERS, values))
        text = f"{question}\n{options}\n{MC_POST}"
        if chat:
            text = render_prompt("vicuna_v1", [{"role": "user", "content": f"{MC_PRE['text']}\n{text}"}],
                                 add_generation_prompt=True)
        return [self.bos, *self.encode(text)], k

    def bench_row(self, rng: np.random.Generator, n: int, chat: bool) -> tuple[list[int], int]:
        """`bench_prompt` followed by the answer letter."""
        ids, k = self.bench_prompt(rng, n, chat)
        ids = [*ids, self.answer_ids[k]]
        if len(ids) > self.length:
            raise ValueError(f"lookup row of {len(ids)} tokens exceeds --length {self.length}")
        return ids, k

    def batch(self, rng: np.random.Generator, n: int, size: int, mask: str):
        x = np.zeros((size, self.length), np.int32)
        attn = np.zeros_like(x)
        weights = np.zeros((size, self.length), np.float32)
        for b in range(size):
            n_b = n or int(rng.integers(2, 5))
            if self.layout == "bench":
                ids, _ = self.bench_row(rng, n_b, chat=bool(self.chat) and rng.random() < self.chat)
            else:
                ids, _ = self.row(rng, n_b, self.shuffle_letters)
            x[b, :len(ids)] = ids
            attn[b, :len(ids)] = 1
            if mask == "all":
                weights[b, 1:len(ids)] = 1.0
            weights[b, len(ids) - 1] = 1.0
        return x, weights, attn

    def micro_probe(self, n: int, seed: int, count: int = 256):
        """Left-padded rows without their answer letter, and the answer indices (rows of this layout; the
        "bench" layout's bare form)."""
        rng = np.random.default_rng([seed, n])
        if self.layout == "bench":
            rows = [self.bench_prompt(rng, n, chat=False) for _ in range(count)]
        else:
            rows = [(ids[:-1], k) for ids, k in (self.row(rng, n) for _ in range(count))]
        return _left_pad([ids for ids, _ in rows]), np.array([k for _, k in rows])

    def bench_probe(self, seed: int, count: int = 256):
        """Text MC in the held-out bench layout (instruction, question, 4 options, answer cue), vicuna."""
        rng = np.random.default_rng([seed, 99])
        rows = [self.bench_prompt(rng, 4, chat=True) for _ in range(count)]
        return _left_pad([ids for ids, _ in rows]), np.array([k for _, k in rows])


def _left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    x = np.zeros((len(rows), width), np.int32)
    attn = np.zeros_like(x)
    for i, r in enumerate(rows):
        x[i, width - len(r):] = r
        attn[i, width - len(r):] = 1
    return x, attn


def build_decoder(init: str, vocab_size: int, **shape: int):
    """The demo base's decoder: random (seed 0) or loaded from a llava-hf folder. `shape` overrides the
    fresh decoder's text config (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads); the initializer scale follows the width (1/sqrt(hidden_size))."""
    from flax import nnx

    from configs.demo_base import get_config
    from instit_jax.loading import load_pretrained
    from instit_jax.models.llm import Decoder
    from instit_jax.train.config import llava_config

    if init != "fresh":
        return load_pretrained(init).language_model
    cfg = llava_config(get_config("text"))
    shape = {k: v for k, v in shape.items() if v}
    if "hidden_size" in shape:
        shape.setdefault("intermediate_size", 3 * shape["hidden_size"])
        shape["initializer_range"] = round(shape["hidden_size"] ** -0.5, 4)
    text = cfg.text.__class__(**{**cfg.text.__dict__, "vocab_size": vocab_size, **shape})
    return Decoder(text, rngs=nnx.Rngs(0))


def run(*, schedule: list[tuple[int, int]], init: str, tokenizer_path: str, lr: float, mask: str,
        batch: int, length: int, seed: int, every: int, shuffle_letters: float = 0.0, log=print,
        shape: dict[str, int] | None = None, layout: str = "short", chat: float = 0.0) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from instit_jax.loading import load_tokenizer
    from instit_jax.models.llm import positions_from_mask

    tok = load_tokenizer(tokenizer_path)
    rows = LookupRows(tok, length, shuffle_letters, layout, chat)
    decoder = build_decoder(init, tok.get_vocab_size(), **(shape or {}))
    graphdef, params = nnx.split(decoder, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_constant_schedule(0.0, lr, 20), weight_decay=0.0))
    opt_state = tx.init(params)

    def logits_of(p, x, attn):
        d = nnx.merge(graphdef, p)
        logits, _ = d(d.embed(x), positions_from_mask(attn), attn)
        return logits

    def loss_fn(p, x, w, attn):
        logp = jax.nn.log_softmax(logits_of(p, x, attn)[:, :-1])
        nll = -jnp.take_along_axis(logp, x[:, 1:, None], -1)[..., 0]
        return (nll * w[:, 1:]).sum() / w[:, 1:].sum()

    @jax.jit
    def step(p, o, x, w, attn):
        loss, g = jax.value_and_grad(loss_fn)(p, x, w, attn)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    last_logits = jax.jit(lambda p, x, attn: logits_of(p, x, attn)[:, -1])
    probes = {f"{n}_options": rows.micro_probe(n, seed + 1000) for n in (2, 3, 4)}
    probes["bench_layout"] = rows.bench_probe(seed + 1000)
    letters = np.array(rows.answer_ids)

    def evaluate(p) -> dict[str, float]:
        out = {}
        for name, ((x, attn), answers) in probes.items():
            n = 4 if name == "bench_layout" else int(name[0])
            scores = np.asarray(last_logits(p, x, attn))[:, letters[:n]]
            out[name] = round(100.0 * float((scores.argmax(-1) == answers).mean()), 1)
        return out

    rng = np.random.default_rng(seed)
    record = {"step": 0, "loss": None, **evaluate(params)}
    log(json.dumps(record))
    t0, done, losses = time.time(), 0, []
    for n, steps in schedule:
        for _ in range(steps):
            params, opt_state, loss = step(params, opt_state, *rows.batch(rng, n, batch, mask))
            losses.append(float(loss))
            done += 1
            if done % every == 0:
                record = {"step": done, "options": n or "2-4", "loss": round(float(np.mean(losses[-every:])), 4),
                          "wall_s": round(time.time() - t0, 1), **evaluate(params)}
                log(json.dumps(record))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.lookup_probe", description=__doc__.splitlines()[0])
    p.add_argument("--schedule", default="0:1000", help="N:STEPS,... options per row (0 = 2-4 mixed) per phase")
    p.add_argument("--init", default="fresh", help="'fresh' or a llava-hf folder whose decoder to start from")
    p.add_argument("--tokenizer", default=str(Path(__file__).parent / "base" / "tokenizer.json"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mask", choices=("answer", "all"), default="all")
    p.add_argument("--batch", type=int, default=192)
    p.add_argument("--length", type=int, default=0,
                   help="tokens per row (default: 40 short, 56 bench bare, 128 bench with --chat)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=50, help="probe every this many steps")
    p.add_argument("--shuffle-letters", type=float, default=0.0,
                   help="fraction of training rows whose options are listed in a random letter order")
    p.add_argument("--layout", choices=LAYOUTS, default="short",
                   help="training rows: 'short' (options, then 'Which option says X?') or 'bench' (the bench's order: "
                        "question, options in letter order, answer cue; bare, or in the chat layout with --chat)")
    p.add_argument("--chat", type=float, default=0.0,
                   help="--layout bench: fraction of rows in the vicuna chat layout with the bench's instruction")
    p.add_argument("--width", type=int, default=0, help="fresh decoder: hidden size (default: the recipe's)")
    p.add_argument("--heads", type=int, default=0, help="fresh decoder: attention heads")
    p.add_argument("--kv-heads", type=int, default=0, help="fresh decoder: key/value heads")
    p.add_argument("--layers", type=int, default=0, help="fresh decoder: layers")
    a = p.parse_args(argv)
    shape = {"hidden_size": a.width, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
             "num_hidden_layers": a.layers}
    if any(shape.values()) and a.init != "fresh":
        raise SystemExit("--width/--heads/--kv-heads/--layers shape a fresh decoder; drop them with --init DIR")
    length = a.length or (40 if a.layout == "short" else 128 if a.chat else 56)
    run(schedule=parse_schedule(a.schedule), init=a.init, tokenizer_path=a.tokenizer, lr=a.lr, mask=a.mask,
        batch=a.batch, length=length, seed=a.seed, every=a.every, shuffle_letters=a.shuffle_letters,
        log=lambda s: print(s, flush=True), shape=shape, layout=a.layout, chat=a.chat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
