"""The demo: a shipped tiny LLaVA-NeXT base for the synthetic shape world, and Inst-IT continuous SFT on it.

It sits above `data_gen` (world, Set-of-Marks, annotation), `instit_jax` (records, trainer, models) and
`eval` (bench runner, scoring, reports) and orchestrates all three:

  world.py       the world's constants and the base model's shape, in one place
  base_data.py   the base's data: dense tower labels, text-only reading, captions, generic unmarked QA
  build_base.py  `instit-demo build-base`: the staged, resumable, deterministic build of the base
"""
