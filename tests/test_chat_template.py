"""Chat templates: exact prompt strings and loss masks covering exactly the answers."""

import numpy as np
import pytest

from instit_jax.chat_template import (
    IMAGE_TOKEN,
    get_template,
    newline_token_id,
    normalize_messages,
    render_prompt,
    stop_token_ids,
    tokenize_conversation,
)
from instit_jax.tokenizer import train_tiny_tokenizer

VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
CONV = [
    {"from": "human", "value": "What is [1] doing? <image>"},
    {"from": "gpt", "value": "It is running."},
    {"from": "human", "value": "And [2]?"},
    {"from": "gpt", "value": "Sitting at <3>."},
]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [VICUNA_SYS, "You are a helpful assistant.", "USER: ASSISTANT: What is doing? It is running.",
              "And Sitting at <3> [1] [2] system user assistant"] * 20
    return train_tiny_tokenizer(corpus, vocab_size=300)


def test_vicuna_prompt_exact():
    expected = (VICUNA_SYS + " USER: <image>\nWhat is [1] doing? ASSISTANT: It is running.</s>"
                "USER: And [2]? ASSISTANT: Sitting at <3>.</s>")
    assert render_prompt("vicuna_v1", CONV) == expected
    gen = render_prompt("vicuna_v1", CONV[:1], add_generation_prompt=True)
    assert gen == VICUNA_SYS + " USER: <image>\nWhat is [1] doing? ASSISTANT:"


def test_qwen_prompt_exact():
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n<image>\nWhat is [1] doing?<|im_end|>\n"
                "<|im_start|>assistant\nIt is running.<|im_end|>\n"
                "<|im_start|>user\nAnd [2]?<|im_end|>\n"
                "<|im_start|>assistant\nSitting at <3>.<|im_end|>\n")
    assert render_prompt("qwen_1_5", CONV) == expected
    gen = render_prompt("qwen_1_5", CONV[:1], add_generation_prompt=True)
    assert gen.endswith("<|im_start|>user\n<image>\nWhat is [1] doing?<|im_end|>\n<|im_start|>assistant\n")


def test_bad_turn_order_names_turn():
    with pytest.raises(ValueError, match="turn 1"):
        render_prompt("vicuna_v1", [CONV[0], CONV[0]])
    with pytest.raises(ValueError, match="message 0"):
        normalize_messages([{"from": "robot", "value": "x"}])


@pytest.mark.parametrize("name", ["vicuna_v1", "qwen_1_5"])
def test_mask_covers_exactly_answers(tokenizer, name):
    tc = tokenize_conversation(tokenizer, name, CONV, image_token_counts=[7])
    ids, mask = tc.input_ids, tc.loss_mask
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    assert (ids == image_id).sum() == 7 and tc.num_image_tokens == 7
    assert mask[ids == image_id].sum() == 0
    trained = tokenizer.decode(ids[mask > 0].tolist(), skip_special_tokens=False)
    end = "</s>" if name == "vicuna_v1" else "<|im_end|>"
    assert trained.replace(" ", "") == f"Itisrunning.{end}Sittingat<3>.{end}"
    # the unexpanded token stream equals a plain encode of the rendered prompt
    plain = tokenizer.encode(render_prompt(name, CONV), add_special_tokens=False).ids
    collapsed = [t for i, t in enumerate(ids.tolist()) if not (t == image_id and i and ids[i - 1] == image_id)]
    if name == "vicuna_v1":
        assert collapsed[0] == tokenizer.token_to_id("<s>") and mask[0] == 0
        collapsed = collapsed[1:]
    assert collapsed == plain


def test_qwen_reference_policy_trains_scaffolding(tokenizer):
    ours = tokenize_conversation(tokenizer, "qwen_1_5", CONV, [3])
    ref = tokenize_conversation(tokenizer, "qwen_1_5", CONV, [3], mask_policy="reference")
    assert ref.loss_mask.sum() > ours.loss_mask.sum()
    im_start = tokenizer.token_to_id("<|im_start|>")
    assert ref.loss_mask[ref.input_ids == im_start].min() == 1.0
    assert ours.loss_mask[ours.input_ids == im_start].max() == 0.0
    # the reference policy is a superset of ours
    assert np.all(ref.loss_mask >= ours.loss_mask)
    v_ours = tokenize_conversation(tokenizer, "vicuna_v1", CONV, [3])
    v_ref = tokenize_conversation(tokenizer, "vicuna_v1", CONV, [3], mask_policy="reference")
    np.testing.assert_array_equal(v_ours.loss_mask, v_ref.loss_mask)


def test_qwen_reference_policy_trains_newlines_of_a_byte_level_bpe(tokenizer):
    # Byte-level BPE (Qwen2's kind) spells "\n" as the byte token "Ċ" (198 in Qwen2): there is no "\n" token.
    assert tokenizer.token_to_id("\n") is None
    newline = tokenizer.token_to_id("Ċ")
    assert newline_token_id(tokenizer) == newline is not None
    ref = tokenize_conversation(tokenizer, "qwen_1_5", CONV, [3], mask_policy="reference")
    at_newlines = ref.loss_mask[ref.input_ids == newline]
    assert len(at_newlines) == render_prompt("qwen_1_5", CONV).count("\n") and at_newlines.min() == 1.0
    ours = tokenize_conversation(tokenizer, "qwen_1_5", CONV, [3])
    assert ours.loss_mask[ours.input_ids == newline].max() == 0.0
    words = train_tiny_tokenizer(["a b c"], vocab_size=50, kind="wordlevel")
    assert newline_token_id(words) is None  # whitespace-split vocabularies have no newline token


def test_placeholder_count_mismatch_and_stop_ids(tokenizer):
    with pytest.raises(ValueError, match="placeholders"):
        tokenize_conversation(tokenizer, "vicuna_v1", CONV, image_token_counts=[])
    assert stop_token_ids(tokenizer, "vicuna_v1") == [tokenizer.token_to_id("</s>")]
    assert tokenizer.token_to_id("<unk>") == 0 and tokenizer.token_to_id("<s>") == 1


@pytest.mark.parametrize("name", ["vicuna_v1", "qwen_1_5"])
def test_all_policy_trains_every_text_token_after_the_system_prompt(tokenizer, name):
    tc = tokenize_conversation(tokenizer, name, CONV, [3], mask_policy="all")
    ids, mask = tc.input_ids, tc.loss_mask
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    assert mask[ids == image_id].sum() == 0
    trained = tokenizer.decode(ids[mask > 0].tolist(), skip_special_tokens=False).replace(" ", "")
    system = "".join(get_template(name).system.split())
    assert system not in trained and "Itisrunning." in trained
    assert ("USER:" if name == "vicuna_v1" else "<|im_start|>user") in trained
    # a superset of the answers policy; untrained: BOS, the system prompt and the visual tokens only
    ours = tokenize_conversation(tokenizer, name, CONV, [3])
    assert np.all(mask >= ours.loss_mask)
    untrained = tokenizer.decode(ids[(mask == 0) & (ids != image_id)].tolist(), skip_special_tokens=False)
    assert "".join(untrained.split()).replace("<s>", "").replace("<|im_start|>system", "").startswith(system[:20])
    with pytest.raises(ValueError, match="mask_policy"):
        tokenize_conversation(tokenizer, name, CONV, [3], mask_policy="everything")
