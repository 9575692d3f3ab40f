"""A local OpenAI-compatible HTTP server for tests and benchmarks (stdlib only, real sockets).

Endpoints: POST /v1/chat/completions (image parts and json_schema structured outputs accepted),
POST /v1/files (multipart), GET /v1/files/{id}, GET /v1/files/{id}/content, POST /v1/batches,
GET /v1/batches/{id}, POST /v1/batches/{id}/cancel.

Answers are deterministic functions of the request: `responder(body) -> str | dict` returns the
message content (or a dict with `content` / `finish_reason` / `refusal`); the default fills the
request's JSON schema with text derived from the request hash. Faults are scripted the same way:
`faults(body, key, attempt) -> None | "429" | "500" | "slow" | "malformed" | "schema" | "drop" |
"length" | "refusal"` where `attempt` counts earlier requests with the same key. `batch_plan(custom_id,
submission) -> "ok" | "fail" | "expire"` scripts Batch API outcomes ("expire" expires the batch there).
`api_faults(route, resource_id, attempt) -> None | HTTP status` scripts errors of GET /v1/batches/{id}
(route "batches.retrieve") and GET /v1/files/{id}/content ("files.content"); `attempt` counts earlier
requests for the same route and ID, and a 429 carries `retry-after`.
`completed[key]` counts answers actually delivered (paid) per request key.

Run standalone: `python tests/openai_server.py --port 0 --latency 0.2 --rpm 3000` prints `URL <base>`
(answers: `instit_responder`, which understands our Inst-IT / SVIT prompts and fills any other schema).
"""
from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[dict[str, Any]], "str | dict[str, Any]"]
FaultPlan = Callable[[dict[str, Any], str, int], "str | None"]
BatchPlan = Callable[[str, int], str]
ApiFaultPlan = Callable[[str, str, int], "int | None"]


def request_key(body: dict[str, Any]) -> str:
    """Stable key of a chat request: model, messages, response format and sampling fields."""
    fields = {k: body.get(k) for k in ("model", "messages", "response_format", "max_tokens", "temperature",
                                        "seed")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def fill_schema(schema: dict[str, Any], seed: str) -> Any:
    """A deterministic instance of a (strict) JSON schema; strings derive from `seed`."""
    defs = schema.get("$defs", {})

    def make(node: dict[str, Any], path: str) -> Any:
        if "$ref" in node:
            return make(defs[node["$ref"].split("/")[-1]], path)
        if "anyOf" in node:
            return make(node["anyOf"][0], path)
        if "enum" in node:
            return node["enum"][0]
        kind = node.get("type")
        if isinstance(kind, list):
            kind = kind[0]
        if kind == "object":
            return {k: make(v, f"{path}.{k}") for k, v in node.get("properties", {}).items()}
        if kind == "array":
            n = max(node.get("minItems", 1), 1)
            return [make(node.get("items", {}), f"{path}[{i}]") for i in range(n)]
        if kind == "string":
            return "text " + hashlib.sha256(f"{seed}{path}".encode()).hexdigest()[:10]
        if kind == "integer":
            return max(1, node.get("minimum", 1))
        if kind == "number":
            return 0.5
        if kind == "boolean":
            return True
        return None
    return make(schema, "")


def schema_responder(body: dict[str, Any]) -> str:
    """Default: a schema-valid JSON answer derived from the request hash (or plain text without schema)."""
    fmt = body.get("response_format") or {}
    seed = request_key(body)
    if fmt.get("type") == "json_schema":
        return json.dumps(fill_schema(fmt["json_schema"]["schema"], seed))
    return f"answer {seed[:12]}"


def _user_text(body: dict[str, Any]) -> str:
    texts = []
    for m in body.get("messages", []):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        else:
            texts += [p["text"] for p in content or [] if p.get("type") == "text"]
    return "\n".join(texts)


def instit_responder(body: dict[str, Any], bad_first: bool = False) -> str:
    """Answers our Inst-IT / SVIT prompts with valid, deterministic JSON built from the prompt.

    With `bad_first`, a first ask (no re-ask note) mentions the unknown instance [99], so the
    client must re-ask; the re-ask gets a valid answer.
    """
    import re

    fmt = body.get("response_format") or {}
    name = fmt.get("json_schema", {}).get("name", "")
    text = _user_text(body)
    h = request_key(body)[:6]
    first_ids = re.search(r"(?:Marked instances(?: in this video)?|marked instances with IDs):? (.*?)[.\n]", text)
    ids = re.findall(r"\[(\d+)\]", first_ids.group(1)) if first_ids else []
    reask = "was rejected" in text
    wrong = " near [99]" if bad_first and not reask else ""
    m = re.search(r"frame <(\d+)> of (\d+)", text)
    t, n = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
    m2 = re.search(r"annotations of the (\d+) frames", text)
    n = int(m2.group(1)) if m2 else n
    if name == "FrameAnswer":
        return json.dumps({"instances": [{"id": i, "caption": f"object [{i}] at <{t}>{wrong}"} for i in ids],
                           "image_caption": f"frame {t} ({h}) scene with " + ", ".join(f"[{i}]" for i in ids),
                           "temporal_change": "" if t == 1 else f"[{ids[0]}] moved between <{t - 1}>-<{t}>"})
    if name == "VideoDescriptionAnswer":
        return json.dumps({"description": f"video {h}: " + " then ".join(f"[{i}]" for i in ids) + f" over <1>-<{n}>{wrong}"})
    if name == "VideoQAAnswer":
        return json.dumps({"pairs": [{"question": f"What does [{i}] do at <{n}>?", "answer": f"[{i}] waits {h}"}
                                     for i in ids]})
    if name == "ImageAnswer":
        return json.dumps({"instances": [{"id": i, "caption": f"object [{i}] {h}{wrong}"} for i in ids],
                           "image_caption": "image with " + ", ".join(f"[{i}]" for i in ids)})
    if name == "SvitReferringAnswer":
        box = "[0.100, 0.200, 0.300, 0.400]" if not (bad_first and not reask) else "[0.500, 0.200, 0.300, 1.400]"
        return json.dumps({"pairs": [{"question": f"Where is <st>dog<ed>{box}? ({k})", "answer": f"It sits, {h}."}
                                     for k in range(10)]})
    return schema_responder(body)


class OpenAIServer:
    """Threaded fake OpenAI server; `with OpenAIServer(...) as srv: srv.base_url`."""

    def __init__(self, responder: Responder | None = None, *, latency: float = 0.0, rpm: float | None = None,
                 faults: FaultPlan | None = None, batch_plan: BatchPlan | None = None,
                 batch_delay: float = 0.05, retry_after: float = 0.05, slow_s: float = 0.5,
                 api_faults: ApiFaultPlan | None = None, host: str = "127.0.0.1", port: int = 0):
        self.responder = responder or schema_responder
        self.latency, self.rpm, self.faults, self.batch_plan = latency, rpm, faults, batch_plan
        self.api_faults = api_faults
        self.api_requests: Counter[tuple[str, str]] = Counter()  # (route, resource id) -> requests seen
        self.batch_delay, self.retry_after, self.slow_s = batch_delay, retry_after, slow_s
        self.lock = threading.Lock()
        self.received: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.faults_sent: Counter[str] = Counter()
        self.rate_limited = 0
        self.active = 0  # chat requests being handled right now
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_submissions: Counter[str] = Counter()
        self._ids = 0
        self._bucket = (rpm / 60.0, time.monotonic()) if rpm else None
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAIServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def new_id(self, prefix: str) -> str:
        with self.lock:
            self._ids += 1
            return f"{prefix}-{self._ids:06d}"

    def take_rate_token(self) -> tuple[bool, float, float]:
        """Server-side token bucket (1 s burst). Returns (allowed, remaining, seconds to next token)."""
        if not self.rpm:
            return True, 1e9, 0.0
        rate = self.rpm / 60.0
        cap = max(1.0, rate)
        with self.lock:
            level, stamp = self._bucket
            now = time.monotonic()
            level = min(cap, level + (now - stamp) * rate)
            if level >= 1.0:
                self._bucket = (level - 1.0, now)
                return True, level - 1.0, 0.0
            self._bucket = (level, now)
            self.rate_limited += 1
            return False, 0.0, (1.0 - level) / rate

    def completion(self, body: dict[str, Any], content: str | None = None, finish: str = "stop",
                   refusal: str | None = None) -> dict[str, Any]:
        """A chat.completion object with usage counted roughly from the request size."""
        if content is None:
            answer = self.responder(body)
            if isinstance(answer, dict):
                content = answer.get("content")
                finish = answer.get("finish_reason", finish)
                refusal = answer.get("refusal")
            else:
                content = answer
        prompt_chars = len(json.dumps(body.get("messages", [])))
        return {"id": self.new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "unknown"),
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant", "content": content, "refusal": refusal}}],
                "usage": {"prompt_tokens": prompt_chars // 4 + 1, "completion_tokens": len(content or "") // 4 + 1,
                          "total_tokens": prompt_chars // 4 + len(content or "") // 4 + 2}}

    # ------------------------------------------------------------------ batches
    def run_batch(self, batch_id: str) -> None:
        time.sleep(self.batch_delay)
        batch = self.batches[batch_id]
        lines = self.files[batch["input_file_id"]]["data"].decode().splitlines()
        out, err = [], []
        expired = False
        for line in lines:
            if not line.strip():
                continue
            req = json.loads(line)
            cid = req["custom_id"]
            with self.lock:
                self.batch_submissions[cid] += 1
                submission = self.batch_submissions[cid]
            outcome = self.batch_plan(cid, submission) if self.batch_plan else "ok"
            expired = expired or outcome == "expire"
            if expired:
                err.append({"id": self.new_id("batch_req"), "custom_id": cid, "response": None,
                            "error": {"code": "batch_expired", "message": "not completed in time"}})
            elif outcome == "fail":
                err.append({"id": self.new_id("batch_req"), "custom_id": cid,
                            "response": {"status_code": 500, "request_id": "x",
                                         "body": {"error": {"message": "internal error", "type": "server_error"}}},
                            "error": None})
            else:
                body = req["body"]
                key = request_key(body)
                with self.lock:
                    self.received[key] += 1
                    self.completed[key] += 1
                out.append({"id": self.new_id("batch_req"), "custom_id": cid, "error": None,
                            "response": {"status_code": 200, "request_id": "x", "body": self.completion(body)}})
        batch["output_file_id"] = self.store_file("\n".join(json.dumps(o) for o in out).encode(),
                                                  "output.jsonl", "batch_output") if out else None
        batch["error_file_id"] = self.store_file("\n".join(json.dumps(e) for e in err).encode(),
                                                 "errors.jsonl", "batch_output") if err else None
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}
        batch["status"] = "expired" if expired else "completed"
        batch[f"{batch['status']}_at"] = int(time.time())

    def store_file(self, data: bytes, filename: str, purpose: str) -> str:
        fid = self.new_id("file")
        self.files[fid] = {"data": data, "filename": filename, "purpose": purpose, "created_at": int(time.time())}
        return fid

    def file_object(self, fid: str) -> dict[str, Any]:
        f = self.files[fid]
        return {"id": fid, "object": "file", "bytes": len(f["data"]), "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}


def _make_handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
                  raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": None}},
                       headers)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _api_fault(self, route: str, resource_id: str) -> bool:
            """Send the scripted error for this request, if any; True when one was sent."""
            with server.lock:
                attempt = server.api_requests[route, resource_id]
                server.api_requests[route, resource_id] += 1
            status = server.api_faults(route, resource_id, attempt) if server.api_faults else None
            if status is None:
                return False
            with server.lock:
                server.faults_sent[f"{route}:{status}"] += 1
            headers = {"retry-after": str(server.retry_after)} if status == 429 else None
            self._send(status, {"error": {"message": f"scripted {status} for {route} {resource_id}",
                                          "type": "server_error" if status >= 500 else "invalid_request_error",
                                          "code": None}}, headers)
            return True

        def do_GET(self) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content":
                if self._api_fault("files.content", parts[2]):
                    return None
            if parts[:2] == ["v1", "batches"] and len(parts) == 3:
                if self._api_fault("batches.retrieve", parts[2]):
                    return None
            if parts[:2] == ["v1", "files"] and len(parts) >= 3 and parts[2] in server.files:
                if len(parts) == 4 and parts[3] == "content":
                    return self._send(200, None, raw=server.files[parts[2]]["data"])
                return self._send(200, server.file_object(parts[2]))
            if parts[:2] == ["v1", "batches"] and len(parts) == 2:
                data = sorted(server.batches.values(), key=lambda b: b["id"], reverse=True)
                return self._send(200, {"object": "list", "data": data, "has_more": False,
                                        "first_id": data[0]["id"] if data else None,
                                        "last_id": data[-1]["id"] if data else None})
            if parts[:2] == ["v1", "batches"] and len(parts) == 3 and parts[2] in server.batches:
                return self._send(200, server.batches[parts[2]])
            self._error(404, f"no such resource {self.path}")

        def do_POST(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            raw = self._body()
            if path == "/v1/chat/completions":
                return self._chat(json.loads(raw))
            if path == "/v1/files":
                return self._upload(raw)
            if path == "/v1/batches":
                return self._create_batch(json.loads(raw))
            if path.startswith("/v1/batches/") and path.endswith("/cancel"):
                batch = server.batches.get(path.split("/")[3])
                if batch is None:
                    return self._error(404, "no such batch")
                return self._send(200, batch)
            self._error(404, f"no route {path}")

        def _chat(self, body: dict[str, Any]) -> None:
            with server.lock:
                server.active += 1
            try:
                self._chat_inner(body)
            finally:
                with server.lock:
                    server.active -= 1

        def _chat_inner(self, body: dict[str, Any]) -> None:
            key = request_key(body)
            with server.lock:
                attempt = server.received[key]
                server.received[key] += 1
            allowed, remaining, wait = server.take_rate_token()
            rl_headers = {}
            if server.rpm:
                rl_headers = {"x-ratelimit-limit-requests": str(int(server.rpm)),
                              "x-ratelimit-remaining-requests": str(int(remaining)),
                              "x-ratelimit-reset-requests": f"{max(wait, 60.0 / server.rpm):.3f}s"}
            if not allowed:
                return self._error(429, "rate limit reached", rl_headers | {"retry-after": f"{wait:.3f}"})
            fault = server.faults(body, key, attempt) if server.faults else None
            if fault:
                with server.lock:
                    server.faults_sent[fault] += 1
            if server.latency:
                time.sleep(server.latency)
            if fault == "429":
                return self._error(429, "rate limit reached", {"retry-after": str(server.retry_after)})
            if fault == "500":
                return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if fault == "slow":
                time.sleep(server.slow_s)
            if fault == "malformed":
                payload = server.completion(body, content='{"this is": not json')
            elif fault == "schema":
                payload = server.completion(body, content='{"unexpected_field": 1}')
            elif fault == "length":
                payload = server.completion(body, content='{"truncated', finish="length")
            elif fault == "refusal":
                payload = server.completion(body, content=None, refusal="I can't help with that.")
            else:
                payload = server.completion(body)
            with server.lock:
                server.completed[key] += 1
            self._send(200, payload, rl_headers)

        def _upload(self, raw: bytes) -> None:
            ctype = self.headers.get("Content-Type", "")
            msg = email.parser.BytesParser().parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
            fields: dict[str, Any] = {}
            for part in msg.get_payload():
                name = part.get_param("name", header="content-disposition")
                fields[name] = (part.get_filename(), part.get_payload(decode=True))
            if "file" not in fields:
                return self._error(400, "missing file")
            filename, data = fields["file"]
            purpose = fields.get("purpose", (None, b"batch"))[1].decode()
            self._send(200, server.file_object(server.store_file(data, filename or "upload.jsonl", purpose)))

        def _create_batch(self, req: dict[str, Any]) -> None:
            fid = req.get("input_file_id")
            if fid not in server.files:
                return self._error(400, f"unknown input_file_id {fid}")
            bid = server.new_id("batch")
            server.batches[bid] = {"id": bid, "object": "batch", "endpoint": req.get("endpoint"),
                                   "input_file_id": fid, "completion_window": req.get("completion_window", "24h"),
                                   "status": "in_progress", "created_at": int(time.time()),
                                   "output_file_id": None, "error_file_id": None, "errors": None,
                                   "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            threading.Thread(target=server.run_batch, args=(bid,), daemon=True).start()
            self._send(200, server.batches[bid])

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--rpm", type=float, default=None)
    args = ap.parse_args()
    srv = OpenAIServer(instit_responder, latency=args.latency, rpm=args.rpm, port=args.port)
    print("URL", srv.base_url, flush=True)
    srv.httpd.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
