"""instit-serve as a subprocess on a loopback port, called with the real openai client on a tiny checkpoint."""
import base64
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_fixtures import ckpt, serve  # noqa: F401  (ckpt: the tiny llava-hf checkpoint fixture)

from instit_jax.generate_cli import main as generate_main

KEY = "sk-test-key"
PROMPT = "what is in the picture?"


@pytest.fixture(scope="module")
def server(ckpt):  # noqa: F811
    d = ckpt[0]
    with serve(d, "--model-name", "tiny", "--api-key", KEY, "--media-root", str(d / "frames"),
               "--max-body-bytes", "200000", "--max-tokens-limit", "64") as base:
        yield base, d


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _ask(client, content, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_greedy_answer_equals_instit_generate(server, capsys):
    base, d = server
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    generate_main(["--ckpt", str(d), "--image", str(d / "img.png"), "--prompt", PROMPT, "--max-new-tokens", "12",
                   "--json"])
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = _ask(client, [{"type": "text", "text": PROMPT},
                        {"type": "image_url", "image_url": {"url": _data_url(d / "img.png")}}], max_tokens=12)
    assert got.choices[0].message.content == cli["text"]
    assert got.usage.completion_tokens == len(cli["tokens"])
    assert got.usage.prompt_tokens == cli["num_prompt_tokens"]
    stream = _ask(client, [{"type": "text", "text": PROMPT},
                           {"type": "image_url", "image_url": {"url": _data_url(d / "img.png")}}],
                  max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == cli["text"]
    # a video: frames as an ordered list of image parts, here given as paths under the media root
    frames = sorted(p.name for p in (d / "frames").iterdir())[:2]
    video = _ask(client, [{"type": "text", "text": "what changes?"}] +
                 [{"type": "image_url", "image_url": {"url": f}} for f in frames], max_tokens=4)
    assert video.usage.prompt_tokens > got.usage.prompt_tokens - 40 and video.usage.completion_tokens >= 1


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server):
    base, d = server
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    img = [{"type": "image_url", "image_url": {"url": _data_url(d / "img.png")}}]
    bad = {
        "broken base64": ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], {}, 400),
        "not an image": ([{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}], {}, 400),
        "outside media root": ([{"type": "image_url", "image_url": {"url": "../img.png"}}], {}, 403),
        "too many tokens": (img, {"max_tokens": 10_000}, 400),
    }
    for name, (content, kw, status) in bad.items():
        with pytest.raises(openai.APIStatusError) as e:
            _ask(client, [{"type": "text", "text": "x"}, *content], **kw)
        assert e.value.status_code == status, name
        assert e.value.body["message"], name
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    req = urllib.request.Request(base + "/chat/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    # a body over the limit is refused from its Content-Length, before any of it is read
    host, port = base.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {10**9}\r\n\r\n{{".encode())
        chunks = []
        while chunk := sock.recv(65536):  # the server closes the connection after the refusal
            chunks.append(chunk)
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.1 413") and "over the limit" in reply
    ok = _ask(client, [{"type": "text", "text": PROMPT}, *img], max_tokens=3)
    assert ok.choices[0].message.content is not None and ok.usage.completion_tokens >= 1


def test_sixteen_concurrent_clients_get_their_own_answers(server):
    base, _ = server
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=300)
    questions = [f"question {i}: what is on the table?" for i in range(4)]
    alone = {q: _ask(client, q, max_tokens=6).choices[0].message.content for q in questions}
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: (questions[i % 4], _ask(client, questions[i % 4], max_tokens=6)), range(16)))
    assert len(got) == 16
    for q, r in got:
        assert r.choices[0].message.content == alone[q]


def test_batch_engine_refills_slots_and_answers_as_alone(ckpt):  # noqa: F811
    from instit_jax.assistant import Assistant, BatchEngine

    assistant = Assistant.from_pretrained(str(ckpt[0]))
    engine = BatchEngine(assistant, max_batch=2, max_context=300, chunk=4)
    jobs = [(f"question {i}: what is on the table?", 3 + 2 * i) for i in range(5)]
    alone = [assistant.answer(q, max_new_tokens=n).tokens for q, n in jobs]
    with ThreadPoolExecutor(5) as pool:
        got = list(pool.map(lambda j: engine.answer(j[0], max_new_tokens=j[1]).tokens, jobs))
    assert got == alone
    s = engine.stats
    assert s["prefills"] == 5 and s["busy_slot_steps"] > s["decode_steps"]  # slots decoded together, refilled
    with pytest.raises(ValueError, match="context"):
        engine.submit("x", max_new_tokens=250)


def test_engines_over_equal_models_reuse_the_compiled_prefill_and_decode(ckpt):  # noqa: F811
    """The engine's jitted functions take the graphdefs as identity-hashed `StaticGraph`s, one per distinct
    graphdef: an engine over a second load of the same checkpoint (equal graphdefs: no per-model closures in
    the modules) compiles nothing new, image prefills (`jitted_forward`) included."""
    import jax

    from instit_jax.assistant import Assistant, BatchEngine
    from instit_jax.models.llava_next import static_graph

    d, _, _, img = ckpt
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: event == "/jax/core/compile/backend_compile_duration" and compiles.append(1))
    first = BatchEngine(Assistant.from_pretrained(str(d)), max_batch=2, max_context=300)
    want = first.answer("what is in the picture?", image=img, max_new_tokens=6).tokens
    assert first.answer("what is on the table?", image=img, max_new_tokens=6).tokens  # same shapes: cached
    before = len(compiles)
    second = BatchEngine(Assistant.from_pretrained(str(d)), max_batch=2, max_context=300)
    assert second.dec_graphdef is first.dec_graphdef and second.graphdef is first.graphdef
    assert static_graph(first.graphdef) is first.graphdef
    assert second.answer("what is in the picture?", image=img, max_new_tokens=6).tokens == want
    assert len(compiles) == before
    first.close()
    second.close()


@pytest.mark.parametrize("text,stops", [
    ("  the red ball \u2603 is left STOP of the cube", ["STOP"]),  # a stop string; a 3-byte char split in tokens
    ("the cube\n\nUSER: and more", ["USER:", "\n\n"]),
    ("\u00e9\u2603 na\u00efve   ", []),  # only multi-byte characters and trailing spaces
    ("\nstops at once", ["\n"]),  # a stop string at the very start: nothing is sent
])
def test_streamed_text_sends_only_what_the_answer_keeps(text, stops):
    """Fed one token at a time, `StreamText` never sends a partial character, a stop string or what follows it,
    and its pieces concatenate to the engine's answer text (decoded, cut at the first stop string, stripped)."""
    from instit_jax.generate import truncate_at_stop_strings
    from instit_jax.serve import StreamText
    from instit_jax.tokenizer import train_tiny_tokenizer

    tok = train_tiny_tokenizer(["the red ball is left of the cube", "USER: what is it? the cube"] * 4,
                               vocab_size=300)
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    stream = StreamText(tok, stops)
    pieces = [stream.feed([i]) for i in ids]
    final = truncate_at_stop_strings(tok.decode(ids, skip_special_tokens=True), stops).strip()
    pieces.append(stream.finish(final))
    assert "".join(pieces) == final
    assert all("\ufffd" not in p for p in pieces)
    if stops == ["STOP"]:
        assert sum(bool(p) for p in pieces[:-1]) >= 4  # sent as the tokens came, not at the end


def test_streaming_sends_tokens_as_decoded_and_honours_stop_strings(server):
    base, d = server
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": _data_url(d / "img.png")}}]
    full = _ask(client, content, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a stop string from the middle of the greedy answer
    assert stop.strip()
    want = _ask(client, content, max_tokens=24, stop=[stop])
    chunks = list(_ask(client, content, max_tokens=24, stop=[stop], stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == want.choices[0].message.content == full[:full.index(stop)].strip()
    assert len(texts) >= 2
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason == want.choices[0].finish_reason
