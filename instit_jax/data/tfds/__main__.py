"""``python -m instit_jax.data.tfds``: prepare the builders without TensorFlow (``tfds build`` imports it).

    python -m instit_jax.data.tfds build inst_it_dataset/video --manual-dir ~/inst-it --data-dir ~/tfds
    python -m instit_jax.data.tfds build inst_it_bench --manual-dir ~/inst-it-bench --data-dir ~/tfds
    python -m instit_jax.data.tfds to-tfrecords --data-dir ~/tfds --config image --config video --out shards/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

import instit_jax.data.tfds  # noqa: F401  (registers the builders)
from instit_jax.data.tfds import convert

NAMES = ("inst_it_dataset/image", "inst_it_dataset/video", "inst_it_bench")


def build(name: str, manual_dir: str, data_dir: str, file_format: str = "array_record") -> str:
    """Prepares one builder from ``manual_dir`` into ``data_dir``; returns the prepared folder."""
    builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return str(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["to-tfrecords"]:
        return convert.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m instit_jax.data.tfds", description=__doc__.splitlines()[0],
                                epilog="to-tfrecords: see python -m instit_jax.data.tfds to-tfrecords --help")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download_and_prepare from the manual dir")
    b.add_argument("name", nargs="+", choices=NAMES)
    b.add_argument("--manual-dir", required=True, help="folder holding the downloaded release files")
    b.add_argument("--data-dir", required=True, help="TFDS data_dir to write to")
    b.add_argument("--file-format", default="array_record", help="array_record (no TF needed) or tfrecord (TF)")
    sub.add_parser("to-tfrecords", help="prepared inst_it_dataset -> our TFRecord shards", add_help=False)
    a = p.parse_args(argv)
    for name in a.name:
        print(f"{name}: prepared in {build(name, a.manual_dir, a.data_dir, a.file_format)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
