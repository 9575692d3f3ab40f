"""Stage bookkeeping and the one evaluation call every demo row goes through."""
from __future__ import annotations

import json
import time
from pathlib import Path


class Stages:
    """Prints one line per stage with its wall time."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn, *a, **kw):
        print(f"[instit-demo] {name} ...", flush=True)
        t = time.time()
        out = fn(*a, **kw)
        self.timings[name] = time.time() - t
        print(f"[instit-demo] {name} done in {self.timings[name]:.1f}s (total {time.time() - self.t0:.0f}s)",
              flush=True)
        return out


def evaluate(model, tok, bench_dir: Path, out_dir: Path, *, media_root: Path | None, batch_size: int,
             label: str) -> dict:
    """Held-out bench -> predictions, strict scores, and eval.report's results/table/chart in `out_dir`."""
    from eval.api import evaluate_model
    from eval.bench import load_bench
    from eval.runner import PREDICTIONS_FILE

    from tqdm import tqdm

    bench = load_bench(bench_dir, media_root=media_root)
    with tqdm(total=len(bench), desc=f"bench {label}", unit="q", mininterval=2) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        res = evaluate_model(model, tok, bench, out_dir, batch_size=batch_size, max_new_tokens=16, mode="strict",
                             label=label, chart=False, data_parallel=False, progress=progress)
    lines = (Path(out_dir) / PREDICTIONS_FILE).read_text().splitlines()
    return {"summaries": res["results"], "predictions": [json.loads(x) for x in lines if x.strip()]}
