"""instit-convert: Hugging Face LLaVA checkpoints <-> instit-jax checkpoints.

  instit-convert hf-to-jax --hf-dir D --out D2      (llava-hf or original LLaVA-NeXT layout in)
  instit-convert jax-to-hf --ckpt D2 --out D3       (llava-hf layout out: config.json, safetensors, tokenizer)

Our checkpoints and training workdirs (hf-to-jax --out, jax-to-hf --ckpt) may be local or gs://; Hugging
Face directories are local.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from etils import epath


def hf_to_jax(hf_dir: str | Path, out: str | epath.PathLike, dtype: str | None = None) -> epath.Path:
    """Convert a HF dir into our Orbax layout (tokenizer files copied)."""
    from instit_jax.convert.orbax_io import copy_tokenizer_files, save_checkpoint
    from instit_jax.loading import load_pretrained

    model = load_pretrained(hf_dir, dtype=dtype)
    out = save_checkpoint(model, out)
    copy_tokenizer_files(hf_dir, out)
    return out


def jax_to_hf(ckpt: str | epath.PathLike, out: str | Path, max_shard_bytes: int = 5 * 2**30,
              dtype: str | None = None) -> list[str]:
    """Write a llava-hf directory transformers' from_pretrained loads (tokenizer files from `ckpt`, which a
    training workdir holds too)."""
    from instit_jax.convert.hf_config import to_llava_hf
    from instit_jax.convert.hf_weights import save_hf_weights
    from instit_jax.convert.orbax_io import copy_tokenizer_files
    from instit_jax.loading import load_pretrained

    model = load_pretrained(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = to_llava_hf(model.cfg)
    if dtype:
        cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    names = save_hf_weights(model, out, max_shard_bytes=max_shard_bytes, dtype=np.dtype(dtype) if dtype else None)
    copy_tokenizer_files(ckpt, out)
    if (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists():
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return names


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="instit-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-jax", help="HF (llava-hf or original) -> instit-jax checkpoint")
    a.add_argument("--hf-dir", type=Path, required=True)
    a.add_argument("--out", required=True, help="instit-jax checkpoint directory (local or gs://)")
    a.add_argument("--dtype", default=None, help="compute dtype stored in the config (e.g. bfloat16)")
    b = sub.add_parser("jax-to-hf", help="instit-jax checkpoint -> llava-hf directory")
    b.add_argument("--ckpt", required=True, help="instit-jax checkpoint or training workdir (local or gs://)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument("--dtype", default=None, help="tensor dtype to write (default: as stored)")
    args = parser.parse_args(argv)
    if args.cmd == "hf-to-jax":
        print(f"wrote {hf_to_jax(args.hf_dir, args.out, args.dtype)}")
    else:
        names = jax_to_hf(args.ckpt, args.out, int(args.max_shard_gb * 2**30), args.dtype)
        print(f"wrote {args.out}: config.json + {len(names)} safetensors file(s)")


if __name__ == "__main__":
    main()
