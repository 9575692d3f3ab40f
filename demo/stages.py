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


def marked_world(wd: Path, size: dict[str, int], seed: int) -> tuple[dict, dict, dict]:
    """The Inst-IT world, its bench-style training QA and the held-out bench (all Set-of-Marks media)."""
    from data_gen.synthetic import generate_bench, generate_world
    from demo import world as W

    world = generate_world(wd / "world", num_images=size["images"], num_videos=size["videos"],
                           frames_per_video=W.FRAMES, seed=seed, difficulty=W.WORLD_DIFFICULTY,
                           label_box=W.MARK_LABEL_BOX, label_grid=W.LABEL_GRID,
                           mask_marks=W.MASK_MARKS)
    qa = generate_bench(wd / "train_qa", num_images=size["qa_images"], num_videos=size["qa_videos"],
                        frames_per_video=W.FRAMES, seed=seed + 500, questions_per_item=W.QA_PER_ITEM,
                        difficulty=W.WORLD_DIFFICULTY, label_box=W.MARK_LABEL_BOX, label_grid=W.LABEL_GRID,
                        mask_marks=W.MASK_MARKS)
    bench = generate_bench(wd / "bench", num_images=size["bench_images"], num_videos=size["bench_videos"],
                           frames_per_video=W.FRAMES, seed=seed + 1000, difficulty=W.WORLD_DIFFICULTY,
                           label_box=W.MARK_LABEL_BOX, label_grid=W.LABEL_GRID,
                           mask_marks=W.MASK_MARKS)
    return world, qa, bench


def annotate(world_root: str | Path, wd: Path, annotator: str, base_url: str | None, model_name: str | None
             ) -> dict:
    """Set-of-Marks + the annotation pipeline over the world: ground truth, or an OpenAI-compatible model."""
    from data_gen.groundtruth import annotate_world

    ann, client = None, None
    if annotator == "openai":
        from data_gen.client.chat import ChatClient
        from data_gen.pipelines.annotator import OpenAIAnnotator

        if not (base_url and model_name):
            raise SystemExit("--annotator openai needs --base-url and --model")
        client = ChatClient(base_url=base_url, model=model_name, cache_path=str(wd / "annotations" / "cache.sqlite"))
        ann = OpenAIAnnotator(client)
    return annotate_world(world_root, wd / "annotations", annotator=ann, client=client)


def run_heldout_bench(model, tok, bench_dir: Path, out_dir: Path, *, media_root: Path | None,
                      batch_size: int, label: str) -> dict:
    """Held-out bench -> predictions, strict scores, and eval.report's results/table/chart in `out_dir`."""
    from tqdm import tqdm

    from eval.api import evaluate_model
    from eval.bench import load_bench
    from eval.runner import PREDICTIONS_FILE

    bench = load_bench(bench_dir, media_root=media_root)
    with tqdm(total=len(bench), desc=f"bench {label}", unit="q", mininterval=2) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        res = evaluate_model(model, tok, bench, out_dir, batch_size=batch_size, max_new_tokens=16, mode="strict",
                             label=label, chart=False, data_parallel=False, progress=progress)
    lines = (Path(out_dir) / PREDICTIONS_FILE).read_text().splitlines()
    return {"summaries": res["results"], "predictions": [json.loads(x) for x in lines if x.strip()]}
