"""Chat templates (vicuna_v1, qwen_1_5), prompt rendering and tokenisation with loss masks.

Messages are dicts with ``role`` in {"system", "user", "assistant"} and ``content``; LLaVA-format turns
(``{"from": "human"|"gpt", "value": ...}``) are accepted too.

Loss mask policy (``mask_policy``):
- ``"answers"`` (default, ours): only assistant answer tokens and the template's end token
  (``</s>`` / ``<|im_end|>``) are trained.
- ``"reference"``: reproduces the reference repositories. For vicuna_v1 it equals ``"answers"``; for
  qwen_1_5 the reference also trains the assistant header, the ``\\n`` after ``<|im_end|>``, and every
  ``\\n``, ``<|im_start|>`` and ``<|im_end|>`` token anywhere in the sequence. We deliberately do not train
  template scaffolding by default (it teaches nothing and up-weights formatting tokens); pick
  ``"reference"`` for exact reproduction of their training signal.
- ``"all"``: language-model pretraining on chat text: every token after the system prompt (user turns,
  template scaffolding, answers, end tokens). Used where a stage teaches the decoder to read, not to answer.
Visual token positions are never trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A conversation template: how turns become one prompt string."""

    name: str
    system: str
    bos_token: str | None  # prepended as an id (never as text) when tokenising
    end_token: str  # closes every assistant answer; trained
    stop_strings: tuple[str, ...]  # generation stops at any of these


VICUNA_V1 = ChatTemplate(
    name="vicuna_v1",
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    bos_token="<s>",
    end_token="</s>",
    stop_strings=("</s>",),
)
QWEN_1_5 = ChatTemplate(
    name="qwen_1_5",
    system="You are a helpful assistant.",
    bos_token=None,
    end_token="<|im_end|>",
    stop_strings=("<|im_end|>", "<|endoftext|>"),
)
TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (VICUNA_V1, QWEN_1_5)}
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    """Looks a template up by name (``vicuna_v1`` / ``qwen_1_5``)."""
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def normalize_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Turns LLaVA (from/value) or OpenAI (role/content) turns into role/content dicts.

    ``<image>`` placeholders are moved to the front of the user message that holds them, as
    ``"<image>\\n" + text.strip()`` (the reference does this for the first user message). A message that
    already starts with its placeholders that way is kept as it is, so an evaluation prompt keeps its
    exact text (the bench post-prompt "The best answer is: " ends with a space).
    """
    out = []
    for i, m in enumerate(messages):
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in _ROLE_ALIASES or not isinstance(content, str):
            raise ValueError(f"message {i}: needs role/from in {sorted(_ROLE_ALIASES)} and a string "
                             f"content/value, got {dict(m)!r}")
        role = _ROLE_ALIASES[role]
        if role != "user" and IMAGE_TOKEN in content:
            raise ValueError(f"message {i}: {IMAGE_TOKEN} may only appear in user messages")
        if role == "user" and IMAGE_TOKEN in content:
            front = (IMAGE_TOKEN + "\n") * content.count(IMAGE_TOKEN)
            if not content.startswith(front):
                content = front + content.replace(IMAGE_TOKEN, "").strip()
        out.append({"role": role, "content": content})
    return out


def _segments(template: ChatTemplate, messages: Sequence[Mapping[str, str]],
              add_generation_prompt: bool) -> list[tuple[str, str]]:
    """Renders to (kind, text) pieces; kind is "system", "answer", "end", "header", "tail" or "scaffold"."""
    msgs = normalize_messages(messages)
    system = template.system
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"turn {i}: expected a {expected} message (turns alternate user/assistant, "
                             f"starting with user), got {m['role']}")
    segs: list[tuple[str, str]] = []
    if template.name == "vicuna_v1":
        # SYSTEM + " " + ("USER: q ASSISTANT: a</s>")* ; the reference joins rounds with no space after </s>.
        segs.append(("system", system + " "))
        for m in msgs:
            if m["role"] == "user":
                segs.append(("scaffold", "USER: " + m["content"] + " "))
            else:
                segs.append(("scaffold", "ASSISTANT: "))
                segs.append(("answer", m["content"]))
                segs.append(("end", template.end_token))
        if add_generation_prompt:
            segs.append(("scaffold", "ASSISTANT:"))
    elif template.name == "qwen_1_5":
        segs.append(("system", "<|im_start|>system\n" + system + "<|im_end|>\n"))
        for m in msgs:
            if m["role"] == "user":
                segs.append(("scaffold", "<|im_start|>user\n" + m["content"] + "<|im_end|>\n"))
            else:
                segs.append(("header", "<|im_start|>assistant\n"))
                segs.append(("answer", m["content"]))
                segs.append(("end", template.end_token))
                segs.append(("tail", "\n"))
        if add_generation_prompt:
            segs.append(("scaffold", "<|im_start|>assistant\n"))
    else:
        raise ValueError(f"template {template.name!r} has no renderer")
    return segs


def render_prompt(template: str | ChatTemplate, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = False) -> str:
    """Renders messages into the template's prompt string (no BOS text)."""
    return "".join(text for _, text in _segments(get_template(template), messages, add_generation_prompt))


@dataclasses.dataclass
class TokenizedConversation:
    """Token ids and a per-token loss mask, both [L]; ``num_image_tokens`` counts expanded ids."""

    input_ids: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] float32, 1 where the token itself is a training target
    num_image_tokens: int


MASK_POLICIES = ("answers", "reference", "all")


def tokenize_conversation(
    tokenizer: Tokenizer,
    template: str | ChatTemplate,
    messages: Sequence[Mapping[str, str]],
    image_token_counts: Sequence[int] = (),
    *,
    add_generation_prompt: bool = False,
    mask_policy: str = "answers",
    image_token: str = IMAGE_TOKEN,
) -> TokenizedConversation:
    """Tokenises a conversation; each ``<image>`` becomes ``image_token_counts[k]`` image-token ids.

    The prompt is tokenised in one piece (so BPE merges match a plain ``tokenizer.encode`` of the
    rendered text); the mask comes from character offsets, so any tokenizer works.
    """
    tmpl = get_template(template)
    if mask_policy not in MASK_POLICIES:
        raise ValueError(f"mask_policy must be one of {MASK_POLICIES}, got {mask_policy!r}")
    segs = _segments(tmpl, messages, add_generation_prompt)
    text = "".join(t for _, t in segs)
    trained_kinds = {"answer", "end"}
    if mask_policy == "all":
        trained_kinds = {"answer", "end", "scaffold", "header", "tail"}
    if mask_policy == "reference" and tmpl.name == "qwen_1_5":
        trained_kinds |= {"header", "tail"}
    spans, pos = [], 0
    for kind, t in segs:
        if kind in trained_kinds:
            spans.append((pos, pos + len(t)))
        pos += len(t)

    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.float32)
    starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
    ends = np.asarray([o[1] for o in enc.offsets], dtype=np.int64)
    for a, b in spans:
        mask[(starts < b) & (ends > a)] = 1.0
    if mask_policy == "reference" and tmpl.name == "qwen_1_5":
        for tid in (tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>"),
                    newline_token_id(tokenizer)):
            if tid is not None:
                mask[ids == tid] = 1.0

    if tmpl.bos_token is not None:
        bos = _require_id(tokenizer, tmpl.bos_token)
        ids = np.concatenate([[bos], ids])
        mask = np.concatenate([[0.0], mask]).astype(np.float32)

    n_placeholders = text.count(image_token)
    if n_placeholders != len(image_token_counts):
        raise ValueError(f"conversation has {n_placeholders} {image_token} placeholders but "
                         f"{len(image_token_counts)} image token counts were given")
    if n_placeholders:
        image_id = _require_id(tokenizer, image_token)
        where = np.flatnonzero(ids == image_id)
        if len(where) != n_placeholders:
            raise ValueError(f"{image_token} must be a single special token of the tokenizer; found "
                             f"{len(where)} ids for {n_placeholders} placeholders")
        reps = np.ones(len(ids), dtype=np.int64)
        reps[where] = np.asarray(image_token_counts, dtype=np.int64)
        ids = np.repeat(ids, reps)
        mask = np.repeat(mask, reps)
        mask[ids == image_id] = 0.0
    return TokenizedConversation(ids.astype(np.int32), mask.astype(np.float32),
                                 int(sum(image_token_counts)))


def newline_token_id(tokenizer: Tokenizer) -> int | None:
    """Id of the single token a lone "\\n" encodes to (byte-level BPE: "Ċ", 198 in Qwen2), else None."""
    ids = tokenizer.encode("\n", add_special_tokens=False).ids
    return int(ids[0]) if len(ids) == 1 else None


def _require_id(tokenizer: Tokenizer, token: str) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise ValueError(f"tokenizer has no id for {token!r}; add it as a special token")
    return int(tid)


def stop_token_ids(tokenizer: Tokenizer, template: str | ChatTemplate) -> list[int]:
    """Ids of the template's stop strings that exist as single tokens in ``tokenizer``."""
    tmpl = get_template(template)
    ids = [tokenizer.token_to_id(s) for s in tmpl.stop_strings]
    return [int(i) for i in ids if i is not None]
