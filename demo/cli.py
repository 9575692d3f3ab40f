"""`instit-demo`: the Inst-IT method in miniature on a CPU, with no key or download.

  instit-demo [--workdir DIR] [--minutes M] [--seed N]   Inst-IT SFT of the shipped base + its controls
  instit-demo --from-scratch ...                         the random-init path (demo/scratch.py)
  instit-demo build-base --out DIR [--hours H] [--ship DIR/base]   rebuild the shipped base
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build-base"]:
        from demo.build_base import main as build_main

        return build_main(argv[1:])
    from demo.run import DEFAULT_BASE

    p = argparse.ArgumentParser(prog="instit-demo", description=__doc__.splitlines()[0],
                                epilog="`instit-demo build-base --help` for the base recipe")
    p.add_argument("--workdir", default="instit_demo_run", help="where every artefact of the run goes")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget; scales data size and steps")
    p.add_argument("--annotator", choices=("groundtruth", "openai"), default="groundtruth")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint for --annotator openai")
    p.add_argument("--model", help="model name for --annotator openai (e.g. gpt-4o-2024-08-06)")
    p.add_argument("--seed", type=int, default=0, help="changes the world, the bench and the SFT order")
    p.add_argument("--base", default=str(DEFAULT_BASE), help="llava-hf folder of the base (default: shipped)")
    p.add_argument("--no-ablation", action="store_true", help="skip row (d), the generic-only SFT control")
    p.add_argument("--from-scratch", action="store_true",
                   help="random init instead of the shipped base (stage 1 captions, then Inst-IT SFT)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    common = dict(minutes=a.minutes, annotator=a.annotator, base_url=a.base_url, model_name=a.model, seed=a.seed)
    if a.from_scratch:
        from demo.scratch import run_from_scratch

        run_from_scratch(a.workdir, **common)
    else:
        from demo.run import run_demo

        run_demo(a.workdir, base=a.base, ablation=not a.no_ablation, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
