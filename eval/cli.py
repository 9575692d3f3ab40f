"""`instit-eval`: run a checkpoint on Inst-It Bench, score predictions (official / strict), draw reports.

  instit-eval run    --ckpt D --bench DIR --out OUT [--splits image video] [--formats mc oe] ...
  instit-eval run    --base-url URL --model M --bench DIR --out OUT ...   (any OpenAI-compatible VLM)
  instit-eval score  --bench DIR --predictions FILE --mode official|strict [--judge-base-url URL ...]
  instit-eval report OUT
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from eval.bench import CONFIGS, load_bench

RUN_FILE = "run.json"
OFFICIAL_DIR = "official"


def _configs(splits: list[str] | None, formats: list[str] | None) -> list[str]:
    splits = splits or ["image", "video"]
    formats = formats or ["mc", "oe"]
    return [c for c, (s, f) in CONFIGS.items() if s in splits and f in formats]


def export_official(predictions: list[dict], out_dir: Path) -> list[Path]:
    """Write the toolkit's per-config files (`image_mc_inference.json`, ...) sorted by question_id."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for cfg, (split, fmt) in CONFIGS.items():
        rows = sorted((p for p in predictions if p["config"] == cfg), key=lambda p: p["question_id"])
        if rows:
            path = out_dir / f"{split}_{fmt}_inference.json"
            keys = ("question_id", "question", "model_prediction", "ground_truth", "split")
            path.write_text(json.dumps([{k: r[k] for k in keys} for r in rows], indent=4))
            paths.append(path)
    return paths


def cmd_run(args: argparse.Namespace) -> int:
    if args.base_url or args.model:
        return cmd_run_openai(args)
    if not args.ckpt:
        raise ValueError("run: give --ckpt DIR, or --base-url URL --model M")
    import instit_jax
    from eval.prompts import DEFAULT_PROMPTS, load_prompts
    from eval.report import model_identity
    from eval.runner import PREDICTIONS_FILE, run_bench

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = load_bench(args.bench, configs=_configs(args.splits, args.formats), media_root=args.media_root,
                       limit=args.limit, allow_outside_root=args.allow_outside_root)
    prompts = load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    model = instit_jax.load_pretrained(args.ckpt, dtype=args.dtype)
    tokenizer = instit_jax.load_tokenizer(args.tokenizer or args.ckpt)
    meta = {"model": model_identity(args.ckpt), "bench": {"path": str(args.bench), "questions": len(bench)},
            "template": args.template, "prompts": prompts.source, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "max_frames": args.max_frames, "dtype": args.dtype,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / RUN_FILE).write_text(json.dumps(meta, indent=2))
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(f"\r{done}/{total} questions ({rate:.2f}/s)", end="", file=sys.stderr, flush=True)

    preds = run_bench(model, tokenizer, bench, template=args.template, prompts=prompts,
                      batch_size=args.batch_size, out_path=out / PREDICTIONS_FILE,
                      max_new_tokens=args.max_new_tokens, max_frames=args.max_frames, progress=progress)
    print(file=sys.stderr)
    export_official(preds, out / OFFICIAL_DIR)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    (out / RUN_FILE).write_text(json.dumps(meta, indent=2))
    print(f"{len(preds)} predictions in {out / PREDICTIONS_FILE}; next: instit-eval score --bench {args.bench} "
          f"--predictions {out / PREDICTIONS_FILE} --mode official")
    return 0


def cmd_run_openai(args: argparse.Namespace) -> int:
    """`run --base-url URL --model M`: the bench answered by an OpenAI-compatible endpoint."""
    from data_gen.client import AnnotationError, CostLedger, UnknownPrice, load_prices
    from eval.openai_runner import ERRORS_FILE, run_bench_openai
    from eval.prompts import DEFAULT_PROMPTS, load_prompts
    from eval.runner import PREDICTIONS_FILE

    if args.ckpt:
        raise ValueError("run: --ckpt and --base-url/--model are two different paths; give one")
    if not args.model:
        raise ValueError("run: --base-url needs --model (the model id the endpoint serves)")
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = load_bench(args.bench, configs=_configs(args.splits, args.formats), media_root=args.media_root,
                       limit=args.limit, allow_outside_root=args.allow_outside_root)
    prompts = load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    try:
        ledger = CostLedger(prices=load_prices(args.prices), max_cost=args.max_cost, path=out / "ledger.json")
        if args.max_cost is not None:
            ledger.require_price(args.model)
    except UnknownPrice as err:
        raise ValueError(str(err)) from err
    # "checkpoint" names the report's row: here the endpoint's model id
    meta = {"model": {"checkpoint": args.model, "base_url": base_url or "https://api.openai.com/v1",
                      "endpoint_model": args.model},
            "bench": {"path": str(args.bench), "questions": len(bench)}, "prompts": prompts.source,
            "max_new_tokens": args.max_new_tokens, "max_frames": args.max_frames, "temperature": 0.0,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / RUN_FILE).write_text(json.dumps(meta, indent=2))
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(f"\r{done}/{total} questions ({rate:.2f}/s)", end="", file=sys.stderr, flush=True)

    try:
        preds, failures, stats = run_bench_openai(
            bench, base_url=base_url, model=args.model, api_key=args.api_key, prompts=prompts, out_dir=out,
            max_new_tokens=args.max_new_tokens, max_frames=args.max_frames, cache_path=args.cache, ledger=ledger,
            rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency, detail=args.detail, progress=progress)
    except AnnotationError as err:  # e.g. no API key for api.openai.com
        raise ValueError(str(err)) from err
    print(file=sys.stderr)
    export_official(preds, out / OFFICIAL_DIR)
    meta.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                seconds=round(time.perf_counter() - t0, 2), client=stats["client"], cost=stats["cost"],
                failures=len(failures))
    (out / RUN_FILE).write_text(json.dumps(meta, indent=2))
    print(f"{len(preds)} predictions in {out / PREDICTIONS_FILE} (${stats['cost']['run_cost_usd']:.4f}); next: "
          f"instit-eval score --bench {args.bench} --predictions {out / PREDICTIONS_FILE} --mode official")
    if failures:
        print(f"warning: {len(failures)} question(s) failed (see {out / ERRORS_FILE}); run the same command "
              "again to ask only those", file=sys.stderr)
        return 1
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from eval.judge import LLMJudge, RuleJudge
    from eval.predictions import read_predictions, score_predictions
    from eval.prompts import load_prompts
    from eval.report import write_report

    paths = [Path(p) for p in args.predictions]
    preds_path = paths[0]
    preds = [rec for p in paths for rec in read_predictions(p, fmt=args.format)]
    bench = load_bench(args.bench, media_root=args.media_root, allow_outside_root=args.allow_outside_root,
                       configs=sorted({p["config"] for p in preds})) if args.bench else None
    judge = None
    if any(CONFIGS[p["config"]][1] == "oe" for p in preds):
        if args.judge == "rule":
            judge = RuleJudge()
        else:
            judge_prompts = load_prompts(args.prompts).judge if args.prompts else None
            base_url = args.judge_base_url or os.environ.get("OPENAI_BASE_URL")
            cache = args.judge_cache or str(Path(args.out or preds_path.parent) / "judge_cache.sqlite")
            judge = LLMJudge(base_url, args.judge_model, cache_path=cache, prompts=judge_prompts,
                             rpm=args.judge_rpm, concurrency=args.judge_concurrency)
    ev = score_predictions(preds, bench=bench, mode=args.mode, parser=args.parser, judge=judge)
    out = Path(args.out or preds_path.parent)
    run_meta = out / RUN_FILE
    meta = json.loads(run_meta.read_text()) if run_meta.is_file() else {}
    results = write_report(out, ev, model=meta.get("model"), run=meta,
                           bench={"path": str(args.bench) if args.bench else None,
                                  "predictions": [str(p) for p in paths]}, label=args.label)
    if judge is not None and getattr(judge, "stats", None):
        print(f"judge: {judge.identity}; {judge.stats}", file=sys.stderr)
    print((out / "results.md").read_text())
    failures = sum(s.get("judge_failures", 0) for s in results["results"].values())
    if failures:
        print(f"warning: {failures} judge call(s) failed; see {out / 'per_question.csv'} (column error)",
              file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from eval.report import render_report

    print(render_report(args.out, label=args.label, chart=not args.no_chart))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instit-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="answer the bench questions with a checkpoint or an OpenAI-compatible model")
    r.add_argument("--ckpt", help="instit-jax checkpoint or Hugging Face LLaVA-NeXT directory")
    r.add_argument("--bench", required=True, help="bench directory (official or synthetic) or a JSONL file")
    r.add_argument("--out", required=True, help="output directory (predictions.jsonl, run.json, official/)")
    r.add_argument("--splits", nargs="+", choices=["image", "video"])
    r.add_argument("--formats", nargs="+", choices=["mc", "oe"])
    r.add_argument("--template", default="vicuna_v1", help="chat template (vicuna_v1 or qwen_1_5)")
    r.add_argument("--prompts", help="the official toolkit's prompts.py, for its exact prompt wording")
    r.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the checkpoint's)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--max-frames", type=int, default=None, help="cap frames per video (default: all)")
    r.add_argument("--limit", type=int, default=None, help="first N questions per config (smoke runs)")
    r.add_argument("--media-root", help="extra root for images / video folders (e.g. the unzipped videos)")
    r.add_argument("--allow-outside-root", action="store_true",
                   help="read bench media named by absolute paths or paths outside the bench folder and --media-root (refused by default)")
    r.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
    o = r.add_argument_group("an OpenAI-compatible model instead of --ckpt (GPT-4o, vLLM, instit-serve)")
    o.add_argument("--base-url", help="endpoint base URL, e.g. http://127.0.0.1:8000/v1 (default: "
                                      "OPENAI_BASE_URL or OpenAI when only --model is given)")
    o.add_argument("--model", help="model id sent in each request")
    o.add_argument("--api-key", help="API key (default: OPENAI_API_KEY; never written anywhere)")
    o.add_argument("--rpm", type=float, default=None, help="requests per minute limit")
    o.add_argument("--tpm", type=float, default=None, help="tokens per minute limit")
    o.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    o.add_argument("--cache", help="SQLite response cache (default: OUT/responses.sqlite)")
    o.add_argument("--max-cost", type=float, default=None, help="USD budget over all runs into OUT (ledger.json)")
    o.add_argument("--prices", help='JSON {"model": [usd_per_1M_in, usd_per_1M_out]} for models not in the table')
    o.add_argument("--detail", choices=["low", "high", "auto"], help="image_url detail sent with every image")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("score", help="score a predictions file (no inference)")
    s.add_argument("--bench", help="bench directory: ground truth from it, missing questions counted")
    s.add_argument("--predictions", required=True, nargs="+",
                   help="predictions.jsonl (several: per-host shards) or official *_inference.json files")
    s.add_argument("--mode", choices=["official", "strict"], default="official")
    s.add_argument("--parser", choices=["official", "clean"], default="official", help="MC answer parser")
    s.add_argument("--format", choices=["mc", "oe"], help="format of a file without `config` fields")
    s.add_argument("--judge", choices=["llm", "rule"], default="llm",
                   help="llm: a chat model endpoint; rule: the synthetic bench's rule-based scorer")
    s.add_argument("--judge-base-url", help="OpenAI-compatible base URL (default: OPENAI_BASE_URL or OpenAI)")
    s.add_argument("--judge-model", default="gpt-4o-2024-08-06")
    s.add_argument("--judge-cache", help="SQLite cache of verdicts (default: OUT/judge_cache.sqlite)")
    s.add_argument("--judge-rpm", type=float, default=None, help="requests per minute limit")
    s.add_argument("--judge-concurrency", type=int, default=16)
    s.add_argument("--prompts", help="the official prompts.py: use its judge prompts (gpt_eval)")
    s.add_argument("--media-root", help="extra root for images / video folders")
    s.add_argument("--allow-outside-root", action="store_true",
                   help="read bench media named by absolute paths or paths outside the bench folder and --media-root (refused by default)")
    s.add_argument("--out", help="report directory (default: the predictions file's directory)")
    s.add_argument("--label", help="name of our row in the table")
    s.set_defaults(func=cmd_score)

    rep = sub.add_parser("report", help="re-draw results.md / results.png from OUT/results.json")
    rep.add_argument("out")
    rep.add_argument("--label")
    rep.add_argument("--no-chart", action="store_true")
    rep.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `instit-eval`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"instit-eval {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
