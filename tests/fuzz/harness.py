"""Running a target: one input checked (accepted, or a named project error), seeded Hypothesis runs, corpus replay.

``check`` is the oracle. ``run_examples`` drives Hypothesis for a number of examples under a fixed seed (the
test suite) and ``run_for`` repeats that with fresh seeds until a time budget is spent (``python -m
tests.fuzz``). Crashing inputs are written to the corpus as JSON (``{"target", "error", "files": {name:
{"text"} | {"b64"}}}``); ``replay_corpus`` runs every corpus file of a target through ``check``.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hseed

from .targets import TARGETS, Ctx, Files, Target, errors_of, seed_files, strategy_of

CORPUS = Path(__file__).parent / "corpus"
MAX_CORPUS_ENTRY = 6000  # bytes of one corpus file; larger crashers are reported but not kept
EXAMPLE_TIMEOUT_S = 20  # one input taking longer is a hang


class Hang(BaseException):
    """An input ran past EXAMPLE_TIMEOUT_S (BaseException: loaders' broad ``except Exception`` cannot eat it)."""


class UnnamedError(AssertionError):
    """A project error whose message does not name the input."""


@contextlib.contextmanager
def _alarm(seconds: int):
    def fire(signum, frame):
        raise Hang(f"input still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check(target: Target, ctx: Ctx, files: Files) -> str:
    """"accepted" or "rejected"; raises (a crash) on any other exception, an unnamed error or a hang."""
    try:
        with _alarm(EXAMPLE_TIMEOUT_S):
            target.run(ctx, files)
    except errors_of(target) as err:
        if not target.names(ctx, err):
            raise UnnamedError(f"{target.name}: {type(err).__name__} does not name the input: {err}") from err
        return "rejected"
    return "accepted"


@dataclass
class Stats:
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    crashes: list[str] = field(default_factory=list)  # one line per distinct (minimised) crash
    saved: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _fuzz_settings(max_examples: int, derandomize: bool) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                    suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink],
                    print_blob=False, report_multiple_bugs=False)


def run_examples(target: Target, ctx: Ctx, max_examples: int, *, seed: int | None = None,
                 stats: Stats | None = None, on_crash=None) -> Stats:
    """``max_examples`` generated inputs through ``check`` (derandomized when ``seed`` is None).

    A crash propagates (after Hypothesis shrinks it); ``on_crash(files, exc)`` sees the minimal input first.
    """
    stats = stats or Stats()
    last: dict = {}

    @_fuzz_settings(max_examples, derandomize=seed is None)
    @given(strategy_of(target, ctx))
    def prop(files: Files) -> None:
        stats.inputs += 1
        try:
            outcome = check(target, ctx, files)
        except BaseException as exc:
            last["files"], last["exc"] = files, exc
            raise
        if outcome == "accepted":
            stats.accepted += 1
        else:
            stats.rejected += 1

    if seed is not None:
        prop = hseed(seed)(prop)
    try:
        prop()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        if on_crash is not None and "files" in last:
            on_crash(last["files"], last["exc"])
        raise
    return stats


def crash_signature(exc: BaseException) -> str:
    """Exception type, the innermost project frame and the first words of the message."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/tests/fuzz/" not in f.filename
              and "hypothesis" not in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}: {str(exc)[:120]}"


def encode_files(files: Files) -> dict:
    out = {}
    for name, data in files.items():
        try:
            text = data.decode("utf-8")
            out[name] = {"text": text} if "\x00" not in text else {"b64": base64.b64encode(data).decode()}
        except UnicodeDecodeError:
            out[name] = {"b64": base64.b64encode(data).decode()}
    return out


def decode_files(entry: dict) -> Files:
    return {n: (v["text"].encode("utf-8") if "text" in v else base64.b64decode(v["b64"]))
            for n, v in entry["files"].items()}


def save_corpus(target: Target, ctx: Ctx, files: Files, note: str) -> str | None:
    """Writes the input's changed files (unchanged seed files are left out) under corpus/<target>/."""
    seeds = seed_files(ctx.seeds)
    changed = {n: d for n, d in files.items() if seeds.get(n) != d}
    missing = sorted(n for n in seeds if n not in files)
    entry = {"target": target.name, "note": note, "files": encode_files(changed), "missing": missing}
    text = json.dumps(entry, indent=1, ensure_ascii=False) + "\n"
    if len(text.encode()) > MAX_CORPUS_ENTRY:
        return None
    folder = CORPUS / target.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    path.write_text(text, encoding="utf-8")
    return str(path)


def corpus_inputs(target: Target, ctx: Ctx) -> list[tuple[Path, Files]]:
    """Every corpus file of ``target`` as the full input (seed files with the entry's files replaced)."""
    out = []
    for path in sorted((CORPUS / target.name).glob("*.json")):
        entry = json.loads(path.read_text(encoding="utf-8"))
        files = {**seed_files(ctx.seeds), **decode_files(entry)}
        for n in entry.get("missing", []):
            files.pop(n, None)
        out.append((path, files))
    return out


def replay_corpus(target: Target, ctx: Ctx) -> dict[str, str]:
    """corpus file name -> outcome; raises on the first crash."""
    return {path.name: check(target, ctx, files) for path, files in corpus_inputs(target, ctx)}


def run_for(target: Target, ctx: Ctx, seconds: float, *, batch: int = 200, first_seed: int = 1,
            save: bool = True, log=print) -> Stats:
    """Fresh seeds, ``batch`` examples each, until ``seconds`` have passed; crashes are counted, not raised."""
    stats = Stats()
    t0 = time.monotonic()
    k = first_seed
    seen: set[str] = set()
    while time.monotonic() - t0 < seconds:
        def on_crash(files: Files, exc: BaseException) -> None:
            sig = crash_signature(exc)
            if sig in seen:
                return
            seen.add(sig)
            stats.crashes.append(sig)
            log(f"  crash: {sig}")
            if save:
                path = save_corpus(target, ctx, files, sig)
                if path:
                    stats.saved.append(path)
        try:
            run_examples(target, ctx, batch, seed=k, stats=stats, on_crash=on_crash)
        except KeyboardInterrupt:
            raise
        except BaseException:
            pass
        k += 1
    stats.seconds = time.monotonic() - t0
    return stats


def setup(target: Target, work: Path) -> Ctx:
    work.mkdir(parents=True, exist_ok=True)
    return target.setup(work)


__all__ = ["TARGETS", "check", "run_examples", "run_for", "replay_corpus", "setup", "Stats", "save_corpus"]
