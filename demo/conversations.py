"""LLaVA-format conversations the demo trains on (beside the annotation pipeline's Inst-IT data).

- `bench_style_conversations`: mark-grounded QA in the bench's MC / OE format on training scenes (disjoint
  from the held-out bench): Inst-IT's question-answer level for images, which the world's annotations
  give only for videos.
- `stage1_conversations`, `train_tokenizer`: the from-scratch path's caption stage and per-run tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def stage1_conversations(world: dict[str, str]) -> list[dict]:
    """LLaVA-format caption data on the raw (unmarked) media: the 'pre-Inst-IT' model's diet.

    The captions are the world's plain captions (instances in reading order with their places, no
    IDs): what a caption of an unmarked image can say, every word predictable from the pixels.
    """
    plain = json.loads(Path(world["plain_captions"]).read_text())
    out: list[dict] = []
    for rec in json.loads(Path(world["image_json"]).read_text()):
        raw = rec["image_path"].replace("/marked/", "/raw/")
        out.append({"id": f"cap-img-{rec['image_id']}", "image": raw,
                    "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                      {"from": "gpt", "value": plain[raw]}]})
    for rec in json.loads(Path(world["video_json"]).read_text()):
        raw = rec["video_path"].replace("/marked/", "/raw/")
        out.append({"id": f"cap-vid-{rec['video_id']}", "video": raw,
                    "conversations": [{"from": "human", "value": "<image>\nDescribe the video briefly."},
                                      {"from": "gpt", "value": plain[raw]}]})
    return out


def _short_prompt(item) -> str:
    """A follow-up turn's text: the question (and options), without the bench's long preamble.

    The options alone say "answer with a letter" once the first turn has: no repeated instruction line
    (it was ~17 of a turn's ~37 tokens, and a 12-turn conversation did not fit 512 tokens).
    """
    if item.fmt == "mc":
        options = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", item.choices))
        return f"{item.question}\n{options}"
    return item.question


def bench_style_conversations(bench_dir: Path, prefix: str, turns_per_conversation: int = 12) -> list[dict]:
    """General instruction data in the bench's question style, from scenes disjoint from the bench.

    Every question about a medium is asked twice, once as MC and once as OE, in two different
    conversations (so no conversation holds the answer to one of its own questions): conversation
    "a" takes MC for the even questions and OE for the odd ones, "b" the opposite. Each conversation's
    first turn is exactly the bench's prompt (what evaluation asks); later turns are the bare question,
    so answers are a large share of the trained tokens. Long question lists are cut into conversations
    of at most `turns_per_conversation` turns.
    """
    from eval.bench import load_bench
    from eval.prompts import DEFAULT_PROMPTS

    bench = load_bench(bench_dir)
    groups: dict[tuple[str, str], dict[str, list]] = {}
    for item in bench.all_items():
        media = item.image if item.split == "image" else item.video_dir
        groups.setdefault((item.split, str(media)), {}).setdefault(item.question_id, []).append(item)
    out = []
    for (split, media), by_question in groups.items():
        rel = str(Path(media).relative_to(bench_dir))
        questions = [sorted(v, key=lambda it: it.fmt) for _, v in sorted(by_question.items())]  # (mc, oe)
        for variant in range(2):
            items = [pair[(i + variant) % len(pair)] for i, pair in enumerate(questions)]
            for c, lo in enumerate(range(0, len(items), turns_per_conversation)):
                turns = []
                for i, item in enumerate(items[lo:lo + turns_per_conversation]):
                    text = "<image>\n" + DEFAULT_PROMPTS.build(item) if i == 0 else _short_prompt(item)
                    turns += [{"from": "human", "value": text}, {"from": "gpt", "value": item.answer}]
                out.append({"id": f"{prefix}-{split}-{Path(rel).stem}-{'ab'[variant]}{c}",
                            **({"image": rel} if split == "image" else {"video": rel}), "conversations": turns})
    return out


def json_strings(x: Any, *, keys: bool = False, out: list[str] | None = None) -> list[str]:
    """Every string in a JSON-like value, depth first (dict keys too with `keys`), appended to `out`."""
    out = [] if out is None else out
    if isinstance(x, str):
        out.append(x)
    elif isinstance(x, dict):
        for k, v in x.items():
            if keys:
                out.append(str(k))
            json_strings(v, keys=keys, out=out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            json_strings(v, keys=keys, out=out)
    return out


def corpus_texts(docs: list[Any]) -> list[str]:
    """Every string (and dict key) in the given parsed JSON documents (for training the tiny tokenizer)."""
    texts: list[str] = []
    for doc in docs:
        json_strings(doc, keys=True, out=texts)
    return texts


def train_tokenizer(wd: Path, json_paths: list[Path]):
    from eval.prompts import DEFAULT_TEMPLATES
    from instit_jax.chat_template import get_template, render_prompt
    from instit_jax.tokenizer import train_tiny_tokenizer

    docs = [json.loads(p.read_text()) for p in json_paths]
    corpus = corpus_texts(docs)
    for tpl in DEFAULT_TEMPLATES.values():
        corpus.extend(tpl.values())
    tmpl = get_template("vicuna_v1")
    # The chat template (system prompt, USER:/ASSISTANT: per turn) is in every sample, but not in the JSON:
    # weigh it as often as it occurs, or BPE leaves it in single characters (86 tokens for the system
    # prompt, 10 per ASSISTANT:) and a 12-turn QA sample spends ~290 of its 512 tokens on the template.
    turns = sum(len(c.get("conversations", ())) // 2 for doc in docs for c in doc if isinstance(c, dict))
    chat = render_prompt(tmpl, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 2,
                         add_generation_prompt=False)
    corpus.extend([chat] * max(1, turns // 2))
    corpus.extend(["A", "B", "C", "D", "Describe the image briefly.", "Describe the video briefly."])
    tok = train_tiny_tokenizer(corpus * 2, vocab_size=768)
    tok.save(str(wd / "tokenizer.json"))
    return tok
