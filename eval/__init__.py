"""Inst-It Bench evaluation: loaders (bench), prompts, batched runner, scoring, judges, reports, CLI.

Python API: `eval.api.evaluate_model(model, tokenizer, bench, out_dir)` runs + scores + reports;
`eval.runner.run_bench(...)` only answers; `eval.predictions.score_predictions(...)` only scores.
"""
