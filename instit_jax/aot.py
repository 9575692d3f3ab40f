"""`instit-compile`: ahead-of-time compile the real train step for a TPU topology on this (CPU) machine.

    instit-compile --config configs/llava_next_vicuna_7b_instit.py --topology v5p:2x2x1 [--json]
        [--micro-batch 2 | --search] [--config.field=value ...]

No weight is allocated: params and optimizer state are `jax.eval_shape` structures carrying their
shardings, the batch is ShapeDtypeStructs of the training batch layout (`instit_jax/data/pipeline.py`) at the config's static shapes (T tokens, N tiles,
F frames). Prints per-device memory (arguments, temporaries, outputs, total), HBM capacity, whether it
fits, compiled FLOPs per step, model FLOPs per step and their ratio (the remat/recompute overhead).
Needs libtpu (`pip install "jax[tpu]==0.10.2"`); no TPU has to be attached.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

# Vendor HBM per chip in bytes (compile-only devices do not report memory_stats).
HBM_BYTES = {
    "v6 lite": 32 * 2**30, "v6e": 32 * 2**30, "v5p": 95 * 2**30, "v5 lite": 16 * 2**30, "v5e": 16 * 2**30,
    "v5": 95 * 2**30, "v4": 32 * 2**30, "v3": 16 * 2**30,
}


def hbm_bytes(device_kind: str, topology: str) -> int:
    """HBM capacity of one chip, from the topology name (preferred) or the device kind (cpu: RAM / N)."""
    if topology.startswith("cpu:"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // int(topology.split(":")[1])
    for key in (topology.split(":")[0].lower(), device_kind.lower()):
        for name, size in HBM_BYTES.items():
            if key.startswith(name) or name == key:
                return size
    raise ValueError(f"unknown HBM size for {device_kind!r} / {topology!r}")


def _per_device_bytes(x: Any) -> int:
    """Bytes of one device's shard of an abstract array (its sharding, else replicated)."""
    import math

    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    return math.prod(shape) * x.dtype.itemsize


def _oom_bytes(msg: str, label: str) -> int | None:
    """Bytes that an XLA out-of-memory message gives after `label` (a regex), as in "program 10.05G"."""
    found = re.search(label + r"([\d.]+)([KMGT])", msg)
    return None if not found else int(float(found.group(1)) * 1024 ** ("KMGT".index(found.group(2)) + 1))


def topology_devices(topology: str) -> list[Any]:
    """Compile-only TPU devices for a name like "v5p:2x2x1" or "v5e:4x4"; "cpu:N" = this host's CPU devices."""
    if topology.startswith("cpu:"):
        import jax

        n = int(topology.split(":")[1])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise SystemExit(f"instit-compile: {topology} needs {n} CPU devices, have {len(devices)} "
                             "(XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        return devices[:n]
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # libtpu missing, held by another process, or an unknown topology name
        raise SystemExit(f"instit-compile: cannot build TPU topology {topology!r}: {e}\n"
                         f"{_topology_hint(str(e))}") from e


def _topology_hint(message: str) -> str:
    """What to do about a failed get_topology_desc, from its message."""
    if "lockfile" in message or "already in use" in message:
        return ("(another process on this host holds libtpu's lock, /tmp/libtpu_lockfile: stop it, or, on a "
                "host without TPU chips, set ALLOW_MULTIPLE_LIBTPU_LOAD=1)")
    return "(needs libtpu: pip install \"jax[tpu]==0.10.2\"; names look like v5p:2x2x1, v5e:4x4)"


def compile_step(config, topology: str, micro_batch: int | None = None) -> dict[str, Any]:
    """AOT-compile the train step of `config` for `topology`; memory / FLOP report as a dict."""
    import jax
    from flax import nnx

    from instit_jax import sharding as shd
    from instit_jax.train import optim
    from instit_jax.train import state as st
    from instit_jax.train import step as stp
    from instit_jax.train.config import check_batch_geometry, compute_config, llava_config
    from instit_jax.train.metrics import model_flops_per_step, peak_flops_per_device
    from instit_jax.train.trainer import _lora_settings, _model_factory, packing_options

    devices = topology_devices(topology)
    mesh = shd.make_mesh(config.mesh, devices)
    if micro_batch:
        with config.unlocked():
            config.train.micro_batch_size = micro_batch
    per_device, num_micro = check_batch_geometry(config, shd.num_batch_shards(mesh))
    cfg = llava_config(config)
    factory = _model_factory(cfg, 0, compute_config(config), _lora_settings(config))  # LoRA factors too
    split = st.split_abstract_model(factory)
    tx, labels, schedules = optim.make_optimizer(config, nnx.to_pure_dict(split.abstract_params), 1000)
    shardings = st.state_shardings(split, tx, mesh, config.mesh.rules)
    abstract = st.abstract_state(split, tx, shardings)
    model = nnx.eval_shape(factory)
    d = config.data
    g, t, s = config.train.global_batch_size, d.max_tokens, cfg.vision.image_size
    i32, f32 = jax.numpy.int32, jax.numpy.float32
    batch = {k: jax.ShapeDtypeStruct((g, t), f32 if k == "loss_mask" else i32)
             for k in ("input_ids", "attention_mask", "targets", "loss_mask", "visual_index")}
    n_tiles = d.max_tiles if d.images_per_batch else 0
    n_frames = d.max_frames if d.videos_per_batch else 0
    packed = packing_options(config)
    if packed:  # packed rows: segment ids, per-conversation positions, one view budget per row
        batch["segment_ids"] = batch["positions"] = jax.ShapeDtypeStruct((g, t), i32)
        batch["views"] = jax.ShapeDtypeStruct((g, packed["max_views"], s, s, 3), f32)
        n_tiles, n_frames = packed["max_views"], 0  # (the tower's FLOPs per view are a tile's)
    else:
        if n_tiles:
            batch["pixel_values"] = jax.ShapeDtypeStruct((g, n_tiles, s, s, 3), f32)
        if n_frames:
            batch["pixel_values_videos"] = jax.ShapeDtypeStruct((g, n_frames, s, s, 3), f32)
    step_fn = stp.make_train_step(
        split, tx, labels, mesh=mesh, shardings=shardings, batch_shapes=batch, num_microbatches=num_micro,
        lr_schedule=schedules["llm"], **stp.step_options(config))
    t0 = time.time()
    # the context mesh lets Pallas kernels (splash) shard_map themselves; the rules pin the model's activations
    with shd.use_mesh(mesh, config.mesh.rules):
        lowered = step_fn.lower(abstract, batch)
    n_dev = len(devices)
    hbm = hbm_bytes(devices[0].device_kind, topology)
    try:
        compiled = lowered.compile()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        args_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
        temp_b, alias_b = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
        total = args_b + out_b + temp_b - alias_b + int(getattr(mem, "generated_code_size_in_bytes", 0))
        peak_b = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)  # XLA's buffer-assignment peak (0: unknown)
        accepted = True
    except Exception as e:  # XLA refuses programs that cannot fit: report what it needed
        msg = str(e)
        temp_b = _oom_bytes(msg, r"HLO temporaries \(") or _oom_bytes(msg, r"\n\s*program\s+")
        if "RESOURCE_EXHAUSTED" not in msg or temp_b is None:
            raise
        batch_shards = shd.num_batch_shards(mesh)
        args_b = _oom_bytes(msg, r"\n\s*arguments\s+") or sum(
            _per_device_bytes(x) for x in jax.tree.leaves(abstract)) + sum(
            _per_device_bytes(x) // batch_shards for x in batch.values())
        out_b = alias_b = sum(_per_device_bytes(x) for x in jax.tree.leaves(abstract))
        total, cost = args_b + temp_b + (_oom_bytes(msg, r"\n\s*reserved\s+") or 0), {}
        peak_b, accepted = 0, False
        print(f"instit-compile: XLA: {msg.splitlines()[0][:300]}", file=sys.stderr)
        if os.environ.get("INSTIT_COMPILE_VERBOSE"):  # XLA lists the largest buffers after the first line
            print("\n".join(msg.splitlines()[1:80]), file=sys.stderr)
    compile_s = time.time() - t0
    model_flops = model_flops_per_step(config, model.tokens_per_tile, model.tokens_per_frame, n_tiles, n_frames)
    # XLA counts a while-loop body once: the micro-batch scan body runs num_micro times. (The loss-chunk
    # scan inside it is still counted once: an undercount of (chunks-1)/chunks of the LM-head FLOPs.)
    compiled_flops = float(cost.get("flops", 0.0)) * num_micro if cost else 0.0
    per_dev_model = model_flops / n_dev
    peak = peak_flops_per_device(0.0, devices[0]) or peak_flops_per_device(0.0, None)
    return {
        "config": config.name, "topology": topology, "devices": n_dev, "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape), "global_batch": g, "per_device_batch": per_device,
        "micro_batch_per_device": per_device // num_micro, "num_microbatches": num_micro, "tokens": t,
        "tiles": n_tiles, "frames": n_frames, "remat": config.train.remat,
        "memory_gib": {"arguments": args_b / 2**30, "temporaries": temp_b / 2**30, "outputs": out_b / 2**30,
                       "aliased": alias_b / 2**30, "total": total / 2**30},
        # XLA:TPU refuses (RESOURCE_EXHAUSTED) programs whose peak exceeds HBM; the sum args + temps + outputs
        # overstates the peak when temporaries overlap donated inputs, so "fits" uses the peak when known.
        "peak_gib": peak_b / 2**30, "hbm_gib": hbm / 2**30, "fits": (peak_b or total) <= hbm,
        "xla_compiled": accepted,
        "compiled_flops_per_device": compiled_flops, "model_flops_per_device": per_dev_model,
        "compiled_over_model": compiled_flops / per_dev_model if per_dev_model else None,
        "peak_flops_per_device": peak or None, "compile_s": compile_s,
    }


def search_micro_batch(config, topology: str, per_device: int) -> tuple[int | None, list[dict[str, Any]]]:
    """Largest per-device micro-batch (dividing the per-device batch) whose step fits HBM."""
    import copy

    reports, best = [], None
    sizes = [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= per_device and per_device % m == 0]
    for m in sizes:
        r = compile_step(copy.deepcopy(config), topology, micro_batch=m)
        reports.append(r)
        print(_line(r), file=sys.stderr, flush=True)
        if not r["fits"]:
            break
        best = m
    return best, reports


def _line(r: dict[str, Any]) -> str:
    m = r["memory_gib"]
    return (f"{r['config']} on {r['topology']} ({r['devices']} x {r['device_kind']}, mesh {r['mesh']}): "
            f"micro-batch {r['micro_batch_per_device']}/device x {r['num_microbatches']}, T={r['tokens']}, "
            f"{r['tiles']} tiles + {r['frames']} frames | memory/device GiB: args {m['arguments']:.2f}, "
            f"temp {m['temporaries']:.2f}, out {m['outputs']:.2f}, total {m['total']:.2f}, peak {r['peak_gib']:.2f} "
            f"of {r['hbm_gib']:.0f} "
            f"-> fits={r['fits']} | compiled FLOPs/device {r['compiled_flops_per_device']:.3e}, model "
            f"{r['model_flops_per_device']:.3e}, ratio {r['compiled_over_model'] or 0:.2f} "
            f"(compile {r['compile_s']:.0f}s)")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="instit-compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe file (configs/*.py)")
    p.add_argument("--topology", required=True, help='TPU topology, e.g. "v5p:2x2x1" or "v5e:4x4"')
    p.add_argument("--micro-batch", type=int, default=0, help="per-device micro-batch (0 = config's)")
    p.add_argument("--search", action="store_true", help="find the largest per-device micro-batch that fits")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a text line")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments {bad}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # host computations on CPU; TPU devices are compile-only
    from instit_jax.train.config import ConfigError, load_config

    try:
        config = load_config(args.config, rest)
    except ConfigError as e:
        print(f"instit-compile: {e}", file=sys.stderr)
        return 2
    if args.search:
        from instit_jax import sharding as shd

        n = len(topology_devices(args.topology))
        ici, _ = shd.mesh_shape(config.mesh, n)
        per_device = config.train.global_batch_size // (ici[0] * ici[1])
        best, reports = search_micro_batch(config, args.topology, per_device)
        out: dict[str, Any] = {"largest_fitting_micro_batch": best, "reports": reports}
    else:
        out = compile_step(config, args.topology, args.micro_batch or None)
    if args.json:
        print(json.dumps(out))
    elif args.search:
        print(f"largest per-device micro-batch that fits: {out['largest_fitting_micro_batch']}")
    else:
        print(_line(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
