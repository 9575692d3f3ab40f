"""instit-generate end to end on a tiny llava-hf checkpoint: same tokens as transformers' generate."""
import json

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from instit_jax import processing as P
from instit_jax.chat_template import tokenize_conversation
from instit_jax.generate_cli import list_frames, main
from instit_jax.tokenizer import train_tiny_tokenizer

PINS = [[28, 56], [56, 28], [56, 56]]
CORPUS = ["A chat between a curious user and an artificial intelligence assistant.",
          "USER: what is in the picture? ASSISTANT: a red ball and a blue cube on the table.",
          "The assistant gives helpful, detailed, and polite answers to the user's questions."] * 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llava_cli")
    tok = train_tiny_tokenizer(CORPUS, vocab_size=160)
    tok.save(str(d / "tokenizer.json"))
    image_id = tok.token_to_id("<image>")
    torch.manual_seed(11)
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14)
    tc = T.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    cfg = T.LlavaNextConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_index=image_id,
                            image_grid_pinpoints=PINS, vision_feature_layer=-2)
    hf = T.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(d)
    img = np.random.default_rng(2).integers(0, 256, (40, 90, 3), dtype=np.uint8)
    Image.fromarray(img).save(d / "img.png")
    frames = d / "frames"
    frames.mkdir()
    for i in (3, 1, 2):
        Image.fromarray(np.roll(img, 7 * i, axis=1)[:, :60]).save(frames / f"{i:03d}.png")
    return d, hf, tok, img


def test_cli_image_answer_matches_transformers(ckpt, capsys):
    d, hf, tok, img = ckpt
    assert main(["--ckpt", str(d), "--image", str(d / "img.png"), "--prompt", "what is in the picture?",
                 "--max-new-tokens", "12", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = P.anyres_token_plan(img.shape[:2], PINS, 28, 2)
    ids = tokenize_conversation(tok, "vicuna_v1", [{"role": "user", "content": "<image>\nwhat is in the picture?"}],
                                [plan.count], add_generation_prompt=True).input_ids[None].astype(np.int64)
    enc = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                     image_grid_pinpoints=PINS)(images=[img], return_tensors="np")
    eos = tok.token_to_id("</s>")
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                          pixel_values=torch.from_numpy(enc["pixel_values"]),
                          image_sizes=torch.from_numpy(enc["image_sizes"]), max_new_tokens=12, do_sample=False,
                          eos_token_id=eos, pad_token_id=tok.token_to_id("<pad>")).numpy()[0, ids.shape[1]:]
    ref = ref[: int(np.flatnonzero(ref == eos)[0]) + 1] if (ref == eos).any() else ref
    assert got["tokens"] == ref.tolist() and len(ref) >= 3, (got, ref)
    assert got["num_prompt_tokens"] == ids.shape[1]
    assert got["text"] == tok.decode(ref.tolist(), skip_special_tokens=True).split("</s>")[0].strip()


def test_cli_video_and_text_only_run(ckpt, capsys):
    d, _, _, _ = ckpt
    assert [p.name for p in list_frames(d / "frames", 2)] == ["001.png", "003.png"]
    main(["--ckpt", str(d), "--video", str(d / "frames"), "--max-frames", "2", "--prompt", "what changes?",
          "--max-new-tokens", "4", "--json"])
    video = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    main(["--ckpt", str(d), "--prompt", "what changes?", "--max-new-tokens", "4", "--json"])
    text = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 1 <= len(video["tokens"]) <= 4 and 1 <= len(text["tokens"]) <= 4
    # 2 frames x 1 pooled token each (2x2 patches, stride 2) plus "<image>\n" -> "\n"
    assert video["num_prompt_tokens"] > text["num_prompt_tokens"]
    with pytest.raises(SystemExit):
        main(["--ckpt", str(d), "--image", str(d / "missing.png"), "--prompt", "x"])


def test_assistant_api_answers_as_the_cli(ckpt, capsys):
    d, _, tok, img = ckpt
    from instit_jax import Assistant

    bot = Assistant.from_pretrained(str(d))
    main(["--ckpt", str(d), "--image", str(d / "img.png"), "--prompt", "what is in the picture?",
          "--max-new-tokens", "12", "--json"])
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bot.answer("what is in the picture?", image=img, max_new_tokens=12).to_dict() == cli
    frames = [Image.open(p) for p in list_frames(d / "frames", 2)]
    main(["--ckpt", str(d), "--video", str(d / "frames"), "--max-frames", "2", "--prompt", "what changes?",
          "--max-new-tokens", "4", "--json"])
    cli_video = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bot.answer("what changes?", frames=frames, max_new_tokens=4).to_dict() == cli_video
    # a caller's stop string cuts the text where it first appears
    full = bot.answer("what is in the picture?", image=img, max_new_tokens=12)
    cut_at = full.text[len(full.text) // 2:][:2]
    if cut_at.strip():
        cut = bot.answer("what is in the picture?", image=img, max_new_tokens=12, stop=[cut_at])
        assert cut.text == full.text.split(cut_at)[0].strip()
    with pytest.raises(ValueError, match="not both"):
        bot.answer("x", image=img, frames=frames)
    with pytest.raises(ValueError, match="uint8 array"):
        bot.answer("x", image=np.zeros((4, 4), np.float32))
