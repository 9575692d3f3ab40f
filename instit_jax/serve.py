"""instit-serve: an OpenAI-compatible chat server over `instit_jax.Assistant`.

    instit-serve --ckpt DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--api-key KEY] [--media-root DIR]

Endpoints: GET /v1/models, POST /v1/chat/completions (text and `image_url` parts; `data:` URLs, and local
paths only under --media-root; several image parts form one video, in order). Concurrent requests are
batched continuously (`instit_jax.assistant.BatchEngine`: up to --max-batch share the jitted decode, a
finished one's slot is refilled at once). Bad input gets an OpenAI-style error JSON with a 4xx code.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import io
import itertools
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from data_gen.confine import UnsafePathError, check_path_text
from instit_jax.assistant import Assistant, BatchEngine
from instit_jax.generate import truncate_at_stop_strings

DEFAULT_MAX_BODY = 32 << 20


class BadRequest(Exception):
    """A client error: HTTP status, OpenAI error type and a message naming what was wrong."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def _decode_image(url: str, media_root: Path | None) -> Image.Image:
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise BadRequest(400, "image_url: data URLs must be base64 encoded", param="messages")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(400, f"image_url: broken base64 ({e})", param="messages") from e
        source = io.BytesIO(raw)
    else:
        if media_root is None:
            raise BadRequest(400, "image_url: only data: URLs are accepted (the server has no --media-root)",
                             param="messages")
        rel = url.removeprefix("file://")
        try:
            check_path_text(rel, "image_url")
            resolved = (media_root / rel).resolve()
            is_file = resolved.is_file()
        except (UnsafePathError, OSError, ValueError) as e:
            raise BadRequest(400, f"image_url: not a usable path ({str(e)[:200]})", param="messages") from e
        if not resolved.is_relative_to(media_root):
            raise BadRequest(403, f"image_url: {url[:200]} is outside the media root", param="messages")
        if not is_file:
            raise BadRequest(400, f"image_url: {url[:200]}: no such file under the media root", param="messages")
        source = resolved
    try:
        with Image.open(source) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRequest(400, f"image_url: the image does not decode ({e})", param="messages") from e


def parse_body(raw: bytes) -> Any:
    """The request body's JSON value; BadRequest when it is not JSON (or nested beyond the parser's depth)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(400, f"request body is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
        raise BadRequest(400, f"request body: {str(e)[:200]}") from e


def parse_messages(messages: Any, media_root: Path | None) -> tuple[str, list[Image.Image]]:
    """-> (question text, images) from the chat messages; one image or several (a video's frames, in order)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages: expected a non-empty list", param="messages")
    texts: list[str] = []
    images: list[Image.Image] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(400, f"messages[{i}]: expected an object with role system/user/assistant",
                             param="messages")
        if msg["role"] != "user":
            continue
        content = msg.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadRequest(400, f"messages[{i}].content: expected a string or a list of parts", param="messages")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise BadRequest(400, f"messages[{i}]: image_url needs a url string", param="messages")
                images.append(_decode_image(url, media_root))
            else:
                raise BadRequest(400, f"messages[{i}]: unsupported content part {kind!r}", param="messages")
    return "\n".join(texts), images


class StreamText:
    """The answer's text as its tokens arrive: `feed(new_tokens)` -> the text that can be sent now, `finish(text)`
    -> the rest of the finished answer. Held back until later tokens decide: the last characters that could be
    the start of a stop string (as many as the longest stop string, less one), trailing whitespace (the answer
    is stripped) and an incomplete UTF-8 sequence (decoded as U+FFFD); the text after a stop string is never
    sent. The pieces concatenate to `BatchEngine`'s answer text."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.hold = max((len(x) for x in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""

    def feed(self, new: Sequence[int]) -> str:
        self.tokens.extend(new)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = truncate_at_stop_strings(text, self.stops)
        safe = cut if len(cut) < len(text) else text[:max(0, len(text) - self.hold)]
        safe = safe.rstrip("\ufffd").strip()
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, text: str) -> str:
        return text[len(self.sent):] if text.startswith(self.sent) else ""


class Server:
    """The model, its name and the request limits; `complete` answers one parsed request body.

    With an `engine` (BatchEngine) concurrent requests are batched; without one, `assistant.answer` is
    called for one request at a time.
    """

    def __init__(self, assistant: Assistant, model_name: str, *, api_key: str | None = None,
                 media_root: str | None = None, max_body: int = DEFAULT_MAX_BODY, max_tokens_limit: int = 1024,
                 engine: BatchEngine | None = None):
        self.assistant, self.model_name, self.api_key, self.engine = assistant, model_name, api_key, engine
        self.media_root = Path(media_root).resolve() if media_root else None
        self.max_body, self.max_tokens_limit = max_body, max_tokens_limit
        self.lock = threading.Lock()

    def request(self, body: Any) -> tuple[str, dict[str, Any]]:
        """Validate a parsed request body -> (question, keywords of `Assistant.answer`); BadRequest if invalid."""
        if not isinstance(body, dict):
            raise BadRequest(400, "request body: expected a JSON object")
        if body.get("model") != self.model_name:
            raise BadRequest(404, f"model {body.get('model')!r} does not exist; this server has {self.model_name!r}",
                             kind="not_found_error", param="model")
        if body.get("n", 1) != 1:
            raise BadRequest(400, "n: only n=1 is supported", param="n")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or min(128, self.max_tokens_limit)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.max_tokens_limit:
            raise BadRequest(400, f"max_tokens: expected an integer in [1, {self.max_tokens_limit}]",
                             param="max_tokens")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest(400, "stop: expected a string or a list of strings", param="stop")
        question, images = parse_messages(body.get("messages"), self.media_root)
        try:
            temperature = float(body.get("temperature") or 0.0)
            top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
            seed = int(body.get("seed") or 0)
        except (TypeError, ValueError, OverflowError) as e:
            raise BadRequest(400, f"temperature / top_p / seed: expected numbers ({e})") from e
        if not 0.0 <= temperature <= 2.0:  # the OpenAI API's range; NaN fails both comparisons
            raise BadRequest(400, f"temperature: expected a number in [0, 2], got {temperature}", param="temperature")
        if not 0.0 < top_p <= 1.0:
            raise BadRequest(400, f"top_p: expected a number in (0, 1], got {top_p}", param="top_p")
        kwargs = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        if len(images) == 1:
            kwargs["image"] = images[0]
        elif images:
            kwargs["frames"] = images
        return question, kwargs

    def complete(self, body: Any) -> dict[str, Any]:
        """Answer a request body -> the chat.completion object."""
        question, kwargs = self.request(body)
        if self.engine is not None:
            ans = self.engine.answer(question, **kwargs)
        else:
            with self.lock:
                ans = self.assistant.answer(question, **kwargs)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name}
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.text},
                                     "finish_reason": self._finish_reason(ans, kwargs["max_new_tokens"])}],
                "usage": self._usage(ans)}

    def _finish_reason(self, ans: Any, max_tokens: int) -> str:
        hit_limit = len(ans.tokens) >= max_tokens and ans.tokens[-1] not in self.assistant.stop_ids
        return "length" if hit_limit else "stop"

    @staticmethod
    def _usage(ans: Any) -> dict[str, int]:
        return {"prompt_tokens": ans.num_prompt_tokens, "completion_tokens": len(ans.tokens),
                "total_tokens": ans.num_prompt_tokens + len(ans.tokens)}

    def stream(self, body: Any) -> Iterator[dict[str, Any]]:
        """Answer a request body as chat.completion.chunk objects, the text sent as the tokens are decoded (with
        an engine; without one, the finished answer in pieces). Validation happens before the first chunk is
        made, so bad input raises BadRequest (or ValueError: a prompt the engine cannot fit) from the first
        `next`. The chunks' contents concatenate to `complete`'s answer (`StreamText`)."""
        question, kwargs = self.request(body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model_name}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        if self.engine is None:
            with self.lock:
                ans = self.assistant.answer(question, **kwargs)
            yield chunk({"role": "assistant", "content": ""})
            for i in range(0, len(ans.text), 8):
                yield chunk({"content": ans.text[i:i + 8]})
            yield chunk({}, self._finish_reason(ans, kwargs["max_new_tokens"]), usage=self._usage(ans))
            return
        events: queue.Queue = queue.Queue()
        job = self.engine.submit(question, on_token=lambda new: events.put(list(new)),
                                 on_done=lambda _: events.put(None), **kwargs)
        yield chunk({"role": "assistant", "content": ""})
        text = StreamText(self.assistant.tokenizer, job.stop)
        while (new := events.get()) is not None:
            if delta := text.feed(new):
                yield chunk({"content": delta})
        if job.error is not None:
            raise job.error
        ans = job.result
        if rest := text.finish(ans.text):
            yield chunk({"content": rest})
        yield chunk({}, self._finish_reason(ans, kwargs["max_new_tokens"]), usage=self._usage(ans))


def make_handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: one line per request is noise under load
            pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, err: BadRequest) -> None:
            self._send(err.status, {"error": {"message": str(err), "type": err.kind, "param": err.param,
                                              "code": None}})

        def _authorized(self) -> bool:
            if server.api_key is None:
                return True
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").encode()
            return hmac.compare_digest(given, server.api_key.encode())

        def do_GET(self) -> None:
            if not self._authorized():
                return self._error(BadRequest(401, "invalid or missing API key", kind="authentication_error"))
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [
                    {"id": server.model_name, "object": "model", "created": 0, "owned_by": "instit-jax"}]})
            self._error(BadRequest(404, f"no route {self.path}", kind="not_found_error"))

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                return self._error(BadRequest(411, "Content-Length is required"))
            if length > server.max_body:  # refused before reading: the connection is closed, not drained
                self.close_connection = True
                return self._error(BadRequest(413, f"request body of {length} bytes is over the limit of "
                                                   f"{server.max_body}"))
            raw = self.rfile.read(length)
            if not self._authorized():
                return self._error(BadRequest(401, "invalid or missing API key", kind="authentication_error"))
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(BadRequest(404, f"no route {self.path}", kind="not_found_error"))
            try:
                body = parse_body(raw)
                if isinstance(body, dict) and body.get("stream"):
                    events = server.stream(body)
                    first = next(events)  # validation and admission happen here: errors still get their 4xx
                    return self._stream(first, events)
                result = server.complete(body)
            except BadRequest as e:
                return self._error(e)
            except ValueError as e:  # the engine refuses inputs it cannot fit (e.g. a prompt over the context)
                return self._error(BadRequest(400, f"input refused: {e}"))
            self._send(200, result)

        def _stream(self, first: dict[str, Any], events: Iterator[dict[str, Any]]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for ev in itertools.chain([first], events):
                    self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):  # the client went away; its answer still finishes
                return
            except Exception as e:  # the answer failed after the 200: an error event, as OpenAI streams do
                err = {"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                                 "code": None}}
                self.wfile.write(f"data: {json.dumps(err)}\n\n".encode())
            self.wfile.flush()

    return Handler


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="instit-serve", description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (anything load_pretrained reads)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    ap.add_argument("--media-root", help="allow image_url local paths, only under this folder")
    ap.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="larger requests get 413")
    ap.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    ap.add_argument("--max-batch", type=int, default=8, help="requests decoded together (continuous batching)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="KV positions per batch slot: a request's prompt + max_tokens must fit (default: the "
                         "model's max_position_embeddings, at most 4096)")
    ap.add_argument("--decode-chunk", type=int, default=8,
                    help="decode steps per jitted call (a call ends early when a request finishes)")
    ap.add_argument("--inference-view", choices=("auto", "on", "off"), default="auto",
                    help="decode with a rearranged copy of six of each block's seven matrices (fused q/k/v and "
                         "gate/up: faster decode, more weight memory); auto = on for CPU, off on accelerators")
    ap.add_argument("--tokenizer", help="tokenizer.json or its folder (default: --ckpt)")
    ap.add_argument("--template", choices=["vicuna_v1", "qwen_1_5"], help="chat template (default by LLM type)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype override")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    assistant = Assistant.from_pretrained(args.ckpt, tokenizer=args.tokenizer, template=args.template,
                                          dtype=args.dtype)
    name = args.model_name or Path(args.ckpt.rstrip("/")).name
    engine = BatchEngine(assistant, max_batch=args.max_batch, max_context=args.max_context, chunk=args.decode_chunk,
                         inference_view={"auto": None, "on": True, "off": False}[args.inference_view])
    server = Server(assistant, name, api_key=args.api_key, media_root=args.media_root,
                    max_body=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit, engine=engine)
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(server))
    print(f"instit-serve: {name} on http://{args.host}:{httpd.server_address[1]}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
