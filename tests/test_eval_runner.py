"""The batched runner on a tiny random LLaVA-NeXT: synthetic bench end to end, resume, batch invariance."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from data_gen.synthetic import generate_bench
from eval.api import evaluate_model
from eval.bench import load_bench, load_image, load_video
from eval.predictions import read_predictions
from eval.prompts import DEFAULT_PROMPTS, DEFAULT_TEMPLATES
from eval.runner import Preparer, run_bench
from instit_jax.chat_template import QWEN_1_5, VICUNA_V1, render_prompt
from instit_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from instit_jax.models.llava_next import LlavaNextModel
from instit_jax.tokenizer import train_tiny_tokenizer

MAX_NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    generate_bench(root, num_images=2, num_videos=1, frames_per_video=3, questions_per_item=2, image_size=48)
    bench = load_bench(root)
    corpus = [it.question + " " + it.answer for it in bench.all_items()]
    corpus += [p for t in DEFAULT_TEMPLATES.values() for p in t.values()]
    tok = train_tiny_tokenizer(corpus * 2, vocab_size=300)
    cfg = LlavaConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2),
        text=TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
        image_token_id=tok.token_to_id("<image>"), image_grid_pinpoints=((32, 64), (64, 32), (64, 64)))
    model = LlavaNextModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)  # larger random weights: answers then depend on the question and image
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype), params))
    return bench, tok, model


def test_end_to_end_synthetic_bench(setup, tmp_path):
    bench, tok, model = setup
    out = tmp_path / "run"
    results = evaluate_model(model, tok, bench, out, batch_size=8, max_new_tokens=MAX_NEW, mode="strict",
                             label="tiny-random", chart=False)
    preds = read_predictions(out / "predictions.jsonl")
    assert len(preds) == len(bench) == 12
    assert len({p["model_prediction"] for p in preds}) >= 10  # input-dependent answers
    assert {(p["config"], p["question_id"]) for p in preds} == set(bench.lookup())
    assert all(set(p) >= {"question_id", "question", "model_prediction", "ground_truth", "split"} for p in preds)
    assert results["model"] == {"checkpoint": "tiny-random"} and results["mode"] == "strict"
    for cfg in ("image_open_ended", "image_multi_choice", "video_open_ended", "video_multi_choice"):
        s = results["results"][cfg]
        assert s["total"] == len(bench.items[cfg]) and s["accuracy"] is not None
    assert (out / "results.md").read_text().count("| tiny-random") == 0  # our row is bold
    assert "| **tiny-random** (strict) |" in (out / "results.md").read_text()


def test_prompt_has_one_placeholder_per_question(setup):
    bench, tok, model = setup
    prep = Preparer(model, tok, "vicuna_v1", DEFAULT_PROMPTS, None)
    for item in (bench.items["image_multi_choice"][0], bench.items["video_open_ended"][0]):
        assert prep.user_text(item).count("<image>") == 1
        p = prep(item)
        assert int((p.input_ids == model.cfg.image_token_id).sum()) == p.plan.count
    assert prep(bench.items["video_open_ended"][0]).pixels.shape[0] == 3  # every frame


@pytest.mark.parametrize("template", ["vicuna_v1", "qwen_1_5"])
def test_mc_prompt_keeps_the_post_prompt_trailing_space(setup, template):
    bench, tok, model = setup
    prep = Preparer(model, tok, template, DEFAULT_PROMPTS, None)
    post = DEFAULT_TEMPLATES["image_mc"]["post_prompt"]
    assert post.endswith(": ")
    item = bench.items["image_multi_choice"][0]
    user = f"<image>\n{DEFAULT_PROMPTS.build(item)}"
    assert user.endswith(post) and prep.user_text(item) == user
    expected = (f"{VICUNA_V1.system} USER: {user} ASSISTANT:" if template == "vicuna_v1" else
                f"<|im_start|>system\n{QWEN_1_5.system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render_prompt(template, [{"role": "user", "content": user}], add_generation_prompt=True) == expected
    ids = prep(item).input_ids.tolist()
    image_id = model.cfg.image_token_id
    ids = [t for i, t in enumerate(ids) if not (t == image_id and ids[i - 1] == image_id)]  # one <image>
    if template == "vicuna_v1":
        assert ids[0] == tok.token_to_id("<s>")
        ids = ids[1:]
    assert ids == tok.encode(expected, add_special_tokens=False).ids


def test_killed_run_resumes_without_redoing_work(setup, tmp_path):
    bench, tok, model = setup
    out = tmp_path / "predictions.jsonl"
    reference = run_bench(model, tok, bench, batch_size=8, max_new_tokens=MAX_NEW)

    class Killed(Exception):
        pass

    def die_after_first_batch(done, total):
        raise Killed

    with pytest.raises(Killed):
        run_bench(model, tok, bench, batch_size=8, out_path=out, max_new_tokens=MAX_NEW,
                  progress=die_after_first_batch)
    first = out.read_text().splitlines()
    assert 0 < len(first) < len(bench)
    with out.open("a") as f:  # the process died while writing the next line
        f.write('{"question_id": "001-0')
    calls = []
    resumed = run_bench(model, tok, bench, batch_size=8, out_path=out, max_new_tokens=MAX_NEW,
                        progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(bench) - len(first),) * 2  # only the unfinished questions ran
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(bench) == len(resumed)
    key = lambda p: (p["config"], p["question_id"])
    assert sorted(map(key, lines)) == sorted(map(key, reference))
    assert {key(p): p["model_prediction"] for p in lines} == {key(p): p["model_prediction"] for p in reference}


def test_batching_does_not_change_greedy_answers(setup):
    bench, tok, model = setup
    items = bench.items["image_multi_choice"] + bench.items["video_open_ended"][:1]
    batched = run_bench(model, tok, items, batch_size=8, max_new_tokens=MAX_NEW)
    single = run_bench(model, tok, items, batch_size=1, max_new_tokens=MAX_NEW, data_parallel=False)
    assert [p["model_prediction"] for p in batched] == [p["model_prediction"] for p in single]


def test_cli_run_score_report(setup, tmp_path, capsys):
    from openai_server import OpenAIServer

    from eval.cli import main
    from instit_jax import save_pretrained

    bench, tok, model = setup
    ckpt = save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    out = tmp_path / "out"
    rc = main(["run", "--ckpt", str(ckpt), "--bench", bench.root, "--out", str(out), "--splits", "image",
               "--max-new-tokens", str(MAX_NEW), "--limit", "2"])
    assert rc == 0
    preds = read_predictions(out / "predictions.jsonl")
    assert len(preds) == 4 and {p["split"] for p in preds} == {"image"}
    assert json.loads((out / "official" / "image_mc_inference.json").read_text())[0]["split"] == "image"
    run_meta = json.loads((out / "run.json").read_text())
    assert run_meta["model"]["config_sha256"] and run_meta["max_new_tokens"] == MAX_NEW

    with OpenAIServer(lambda body: json.dumps({"score": 0.7})) as srv:
        rc = main(["score", "--predictions", str(out / "predictions.jsonl"), "--mode", "strict",
                   "--judge-base-url", srv.base_url, "--judge-model", "judge-x"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    oe = results["results"]["image_open_ended"]
    assert oe["accuracy"] == pytest.approx(70.0) and oe["judge_model"].startswith("judge-x @ http://127.0.0.1")
    assert results["model"]["checkpoint"] == str(ckpt) and (out / "judge_cache.sqlite").is_file()
    assert "| Image OE | Image MC |" in capsys.readouterr().out

    rc = main(["score", "--bench", bench.root, "--predictions", str(out / "predictions.jsonl"),
               "--judge", "rule", "--out", str(tmp_path / "rule")])
    assert rc == 0
    rule = json.loads((tmp_path / "rule" / "results.json").read_text())["results"]
    assert rule["image_open_ended"]["missing"] == len(bench.items["image_open_ended"]) - 2
    assert main(["report", str(tmp_path / "rule"), "--no-chart"]) == 0
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_runner_answers_as_assistant_answer_and_frame_padding_changes_nothing(setup):
    from instit_jax.assistant import Assistant, BatchEngine

    bench, tok, model = setup
    image, video = bench.items["image_open_ended"][0], bench.items["video_multi_choice"][0]
    preds = run_bench(model, tok, [image, video], batch_size=2, max_new_tokens=MAX_NEW)
    bot = Assistant(model, tok, "vicuna_v1")
    frames = load_video(video)
    alone = [bot.answer(DEFAULT_PROMPTS.build(image), image=load_image(image), max_new_tokens=MAX_NEW),
             bot.answer(DEFAULT_PROMPTS.build(video), frames=frames, max_new_tokens=MAX_NEW)]
    assert [p["model_prediction"] for p in preds] == [a.text for a in alone]
    engine = BatchEngine(bot, max_batch=2)
    try:  # the runner pads a video's frames to a multiple of 4; no token refers to the padding frames
        padded = bot.prepare(DEFAULT_PROMPTS.build(video), frames=frames, frame_multiple=4)
        assert padded["videos"].shape[1] == 4 and len(frames) == 3
        job = engine.submit_prepared(padded, max_new_tokens=MAX_NEW)
        job.done.wait()
        assert job.result.tokens == alone[1].tokens
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("x", max_new_tokens=2)


def test_assistant_answers_from_the_models_current_weights(setup):
    """`answer` decodes with a cached inference view on CPU; changing the decoder's weights rebuilds it, so the
    answer is the changed model's (as `inference_view=False`, which reads the decoder directly, gives)."""
    from flax import nnx

    from instit_jax.assistant import Assistant

    _, tok, model = setup
    model = nnx.clone(model)
    bot, direct = Assistant(model, tok, "vicuna_v1"), Assistant(model, tok, "vicuna_v1", inference_view=False)
    before = bot.answer("What is shown?", max_new_tokens=MAX_NEW)
    assert bot.view() is bot.view() and bot.inference_view
    head = model.language_model.layers[0].mlp.down_proj
    head.kernel = nnx.Param(head.kernel[...] * -3.0)
    after = bot.answer("What is shown?", max_new_tokens=MAX_NEW)
    assert after.tokens == direct.answer("What is shown?", max_new_tokens=MAX_NEW).tokens
    assert after.tokens != before.tokens
