"""Fuzzing harness: one Hypothesis target per entry point that reads hostile input (see docs/reliability.md).

`pytest tests/fuzz` runs a short seeded run of every target and replays `corpus/`; `python -m tests.fuzz
--minutes N` runs every target longer and prints inputs tried and crashes per target.
"""
