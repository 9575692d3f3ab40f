"""Inst-It Bench loaders (re-exported): the code lives in `instit_jax.data.bench` so that the TFDS bench
builder and the evaluator share it without `instit_jax` importing `eval`."""
from instit_jax.data.bench import (  # noqa: F401
    CHOICE_KEYS,
    CONFIGS,
    FRAME_EXTS,
    TABLE_EXTS,
    Bench,
    BenchError,
    BenchItem,
    config_name,
    find_config_files,
    list_frames,
    load_bench,
    load_generic,
    load_image,
    load_video,
    make_item,
    read_records,
)
