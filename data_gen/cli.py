"""`instit-annotate {video,image,svit}`: annotate a manifest with any OpenAI-compatible model.

Exit codes: 0 every item succeeded; 3 some items failed (see OUT/errors.jsonl); 4 stopped by
--max-cost (finished items are kept; rerun with a higher budget to continue); 2 unusable arguments
or manifest. The API key comes from OPENAI_API_KEY and is never logged, cached or written.

--max-cost bounds the spend of every run into OUT together (kept in OUT/ledger.json, so a killed run
resumes with what it spent) and needs a price for --model: the built-in table, --prices FILE, or
--price-in/--price-out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from data_gen.client import AnnotationError, CostLedger, UnknownPrice, load_prices, make_client
from data_gen.manifest import read_manifest
from data_gen.pipelines.annotator import OpenAIAnnotator
from data_gen.pipelines.instit import estimate_image, estimate_video
from data_gen.pipelines.runner import run_pipeline
from data_gen.pipelines.svit import estimate_svit
from data_gen.pipelines.svit_scene import InputError

EXIT_OK, EXIT_USAGE, EXIT_PARTIAL, EXIT_BUDGET = 0, 2, 3, 4
ESTIMATORS = {"video": estimate_video, "image": estimate_image, "svit": estimate_svit}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="instit-annotate", description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["video", "image", "svit"])
    ap.add_argument("--manifest", required=True, help="manifest JSONL (see data_gen/manifest.py)")
    ap.add_argument("--allow-outside-root", action="store_true",
                    help="accept media paths that are absolute or resolve outside the manifest's folder "
                         "(refused by default)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (default: OpenAI)")
    ap.add_argument("--model", default="gpt-4o-2024-08-06")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    ap.add_argument("--rpm", type=float, default=None, help="requests per minute limit")
    ap.add_argument("--tpm", type=float, default=None, help="tokens per minute limit")
    ap.add_argument("--items-in-flight", type=int, default=None, help="items processed at once")
    ap.add_argument("--batch", action="store_true", help="use the Batch API (half price, resumable)")
    ap.add_argument("--batch-poll-s", type=float, default=30.0)
    ap.add_argument("--batch-gather-s", type=float, default=5.0)
    ap.add_argument("--estimate", action="store_true", help="print the expected cost; make no calls")
    ap.add_argument("--max-cost", type=float, default=None,
                    help="stop cleanly before the runs into OUT together spend more USD")
    ap.add_argument("--prices", default=None, help='JSON {"model": [usd_in_per_1M, usd_out_per_1M]}')
    ap.add_argument("--price-in", type=float, default=None, help="USD per 1M input tokens of --model")
    ap.add_argument("--price-out", type=float, default=None, help="USD per 1M output tokens of --model")
    ap.add_argument("--cache-dir", default=None, help="response cache + batch state (default OUT/cache)")
    ap.add_argument("--max-retries", type=int, default=8)
    ap.add_argument("--max-reasks", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--detail", choices=["high", "low", "auto"], default="high")
    ap.add_argument("--qa-pairs", type=int, default=12, help="QA pairs asked per video")
    ap.add_argument("--backoff-base", type=float, default=0.5)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def estimate(kind: str, items: list, annotator: OpenAIAnnotator, ledger: CostLedger, model: str,
             batch: bool) -> dict:
    requests = tin = tout = 0
    bad = []
    for item in items:
        try:
            plan = ESTIMATORS[kind](item, annotator)
        except InputError as err:
            bad.append({"item_id": item.item_id, "reason": str(err)})
            continue
        requests += len(plan)
        tin += sum(p[0] for p in plan)
        tout += sum(p[1] for p in plan)
    return {"estimate": True, "model": model, "batch": batch, "items": len(items), "unusable_items": len(bad),
            "requests": requests, "input_tokens": tin, "output_tokens": tout,
            "cost_usd": round(ledger.price(model, tin, tout, batch), 4), "errors": bad[:20]}


def build_ledger(args: argparse.Namespace, out: Path) -> CostLedger:
    """The run's ledger over OUT/ledger.json; raises UnknownPrice for a budget without a price."""
    prices = load_prices(args.prices)
    if args.price_in is not None:
        prices[args.model] = (args.price_in, args.price_out)
    ledger = CostLedger(prices=prices, max_cost=args.max_cost, path=None if args.estimate else out / "ledger.json")
    if args.max_cost is not None:
        ledger.require_price(args.model)
    return ledger


async def _run(args: argparse.Namespace) -> int:
    items = read_manifest(args.manifest, args.kind, allow_outside_root=args.allow_outside_root)
    out = Path(args.out)
    ledger = build_ledger(args, out)
    client = make_client(args.base_url, args.model, cache_dir=args.cache_dir or str(out / "cache"),
                         batch=args.batch, batch_gather_s=args.batch_gather_s, batch_poll_s=args.batch_poll_s,
                         rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency, max_retries=args.max_retries,
                         max_reasks=args.max_reasks, timeout=args.timeout, temperature=args.temperature,
                         max_tokens=args.max_tokens, ledger=ledger, backoff_base=args.backoff_base,
                         api_key="estimate-only" if args.estimate else None)
    annotator = OpenAIAnnotator(client, detail=args.detail, qa_pairs=args.qa_pairs)
    try:
        if args.estimate:
            print(json.dumps(estimate(args.kind, items, annotator, ledger, args.model, args.batch)))
            return EXIT_OK
        in_flight = args.items_in_flight or (50_000 if args.batch else max(8, 2 * args.concurrency))
        summary = await run_pipeline(args.kind, items, annotator, out, client=client, items_in_flight=in_flight,
                                     progress=not args.no_progress)
    finally:
        await client.aclose()
    print(json.dumps(asdict(summary)))
    if summary.stopped_by_budget:
        return EXIT_BUDGET
    return EXIT_OK if summary.failed == 0 else EXIT_PARTIAL


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if (args.price_in is None) != (args.price_out is None):
        ap.error("--price-in and --price-out go together")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = asyncio.run(_run(args))
    except (InputError, AnnotationError, FileNotFoundError, UnknownPrice) as err:
        print(f"instit-annotate: {err}", file=sys.stderr)
        code = EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
