"""python -m tests.fuzz [--minutes N] [--target NAME ...] [--no-save]: every target fuzzed for N minutes each.

Prints per target: inputs tried (including Hypothesis' shrinking replays), accepted / rejected, distinct
crashes (each minimised crash is written to tests/fuzz/corpus/<target>/ unless --no-save), corpus size.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> int:
    from .harness import CORPUS, TARGETS, replay_corpus, run_for, setup

    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="minutes per target")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these targets")
    ap.add_argument("--seed", type=int, default=1, help="first Hypothesis seed (each batch takes the next)")
    ap.add_argument("--batch", type=int, default=200, help="examples per Hypothesis run")
    ap.add_argument("--no-save", action="store_true", help="do not write crashing inputs to the corpus")
    args = ap.parse_args(argv)
    names = args.target or sorted(TARGETS)
    rows, total_crashes = [], 0
    for name in names:
        target = TARGETS[name]
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
            ctx = setup(target, Path(work))
            replay_corpus(target, ctx)
            print(f"{name}: {target.doc}; {args.minutes:g} min", flush=True)
            stats = run_for(target, ctx, args.minutes * 60, batch=args.batch, first_seed=args.seed,
                            save=not args.no_save)
        files = list((CORPUS / name).glob("*.json"))
        size = sum(f.stat().st_size for f in files)
        total_crashes += len(stats.crashes)
        rows.append((name, stats.inputs, stats.seconds / 60, stats.accepted, stats.rejected, len(stats.crashes),
                     len(files), size))
        print(f"{name}: {stats.inputs} inputs in {stats.seconds / 60:.1f} min ({stats.accepted} accepted, "
              f"{stats.rejected} rejected), {len(stats.crashes)} crashes, corpus {len(files)} files "
              f"({size / 1024:.1f} KiB)", flush=True)
    print("\n| target | inputs tried | minutes | accepted | rejected | crashes | corpus files | corpus KiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, mins, acc, rej, crashes, nfiles, size in rows:
        print(f"| {name} | {n} | {mins:.1f} | {acc} | {rej} | {crashes} | {nfiles} | {size / 1024:.1f} |")
    return 1 if total_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
