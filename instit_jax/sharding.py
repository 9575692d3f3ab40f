"""Device mesh (data / fsdp / tensor), logical-axis rules, and host batches -> global arrays.

Mesh axes:
  data    pure data parallelism (params replicated along it); across slices this is where DCN goes
  fsdp    batch AND params sharded (ZeRO-3 style: weights all-gathered per layer, grads reduce-scattered)
  tensor  Megatron-style split of heads / MLP width / vocabulary (off by default)

The model files name every parameter dimension with a logical axis (see the tables at the top of
`models/vit.py` and `models/llm.py`); a rules table maps logical names to mesh axes. A dimension whose
size the mesh axes do not divide falls back to replication, and a large parameter that got no fsdp
dimension from its names is sharded along its largest divisible dimension, so every rules table works
for every model size.

Key activations are named too (`act_*`, the layouts at the top of `models/llm.py` and `models/vit.py`):
`with_logical_constraint(x, names)` pins them to the same rules table while a step is traced under
`use_mesh(mesh, rules)` (the trainer and instit-compile), and returns x untouched otherwise (one device,
inference).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both
MeshAxes = str | tuple[str, ...] | None

# Logical name -> mesh axis (or axes). Names absent from a table are replicated: among the activation
# names, `act_len` (tokens) and `act_embed` (the residual width; the batch already holds fsdp) always are.
RULES: dict[str, dict[str, MeshAxes]] = {
    # Pure FSDP: every matrix sharded along its model-width dimension over fsdp; nothing on tensor.
    "fsdp": {
        "act_batch": BATCH_AXES,
        "embed": "fsdp",
        "vision_embed": "fsdp",
    },
    # FSDP over the width + tensor parallelism over heads, MLP and vocabulary.
    "fsdp_tp": {
        "act_batch": BATCH_AXES,
        "act_heads": "tensor",
        "act_kv_heads": "tensor",
        "act_mlp": "tensor",
        "embed": "fsdp",
        "vision_embed": "fsdp",
        "q_heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "vocab": "tensor",
        "vision_heads": "tensor",
        "vision_mlp": "tensor",
    },
    # Params replicated, batch split (single device, debugging).
    "replicated": {"act_batch": BATCH_AXES},
}

# The rules table `with_logical_constraint` resolves activation names with (set by `use_mesh`).
_ACTIVE_RULES: contextvars.ContextVar[Mapping[str, MeshAxes] | None] = contextvars.ContextVar(
    "instit_jax_activation_rules", default=None)

# Parameters smaller than this stay replicated when their logical names give them no fsdp axis.
_AUTO_FSDP_MIN_SIZE = 2**14


def initialize_distributed(mode: str = "auto") -> None:
    """Call jax.distributed.initialize() for multi-host runs ("auto": only when a cluster is detected)."""
    if mode == "off":
        return
    if mode == "auto":
        import os

        markers = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                   "JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")
        multi = any(os.environ.get(k) for k in markers)
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if not multi or (hosts and "," not in hosts and not os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")):
            return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _fill(sizes: Sequence[int], total: int, what: str) -> list[int]:
    sizes = list(sizes)
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1:
        raise ValueError(f"{what}: at most one axis may be -1, got {sizes}")
    if -1 in sizes:
        if total % known:
            raise ValueError(f"{what}: {total} devices do not divide by the fixed axes {sizes}")
        sizes[sizes.index(-1)] = total // known
    if math.prod(sizes) != total:
        raise ValueError(f"{what}: axes {dict(zip(AXES, sizes))} use {math.prod(sizes)} devices, have {total}")
    return sizes


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int, num_slices: int = 1) -> tuple[list[int], list[int]]:
    """(per-slice sizes, across-slice sizes) for axes data/fsdp/tensor, with -1 filled in."""
    if num_devices % num_slices:
        raise ValueError(f"{num_devices} devices do not split into {num_slices} slices")
    ici = _fill([mesh_cfg["data"], mesh_cfg["fsdp"], mesh_cfg["tensor"]], num_devices // num_slices, "mesh")
    dcn = _fill([mesh_cfg.get("dcn_data", -1), mesh_cfg.get("dcn_fsdp", 1), mesh_cfg.get("dcn_tensor", 1)],
                num_slices, "mesh.dcn_*")
    return ici, dcn


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor); multi-slice devices get a hybrid ICI x DCN layout."""
    devices = list(jax.devices() if devices is None else devices)
    num_slices = 1 + max(getattr(d, "slice_index", 0) or 0 for d in devices)
    ici, dcn = mesh_shape(mesh_cfg, len(devices), num_slices)
    if num_slices > 1:
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(ici)
    return Mesh(arr, AXES)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _named_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Any, rules: Mapping[str, MeshAxes]
                ) -> tuple[list[MeshAxes], set[str]]:
    """Each dimension's mesh axes from its logical name: the rule's axes of size > 1 not taken by an
    earlier dimension, when they divide the dimension; else None (replicated). -> (spec, axes used)."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    spec: list[MeshAxes] = []
    used: set[str] = set()
    for name, dim in zip(logical, shape):
        axes = rules.get(name) if name else None
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        flat = tuple(a for a in flat if mesh.shape.get(a, 1) > 1 and a not in used)
        if flat and dim % _axis_size(mesh, flat) == 0:
            spec.append(flat[0] if len(flat) == 1 else flat)
            used.update(flat)
        else:
            spec.append(None)
    return spec, used


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, MeshAxes]) -> PartitionSpec:
    """Map one param's logical axis names (or None) to a PartitionSpec valid for its shape on `mesh`."""
    if len(shape) < 2:  # norms, biases, image_newline: tiny, replicate (no per-layer all-gather)
        return PartitionSpec(*([None] * len(shape)))
    spec, used = _named_spec(tuple(logical) if logical else (None,) * len(shape), shape, mesh, rules)
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in used and math.prod(shape) >= _AUTO_FSDP_MIN_SIZE:
        order = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in order:
            if spec[i] is None and shape[i] % fsdp == 0:
                spec[i] = "fsdp"
                break
    return PartitionSpec(*spec)


def activation_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Any,
                    rules: Mapping[str, MeshAxes]) -> PartitionSpec:
    """An activation's logical axis names -> a PartitionSpec for its shape on `mesh` (a Mesh or the traced
    abstract mesh): the rules' axes where they divide the dimension, replicated elsewhere."""
    return PartitionSpec(*_named_spec(tuple(logical), shape, mesh, rules)[0])


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: str | Mapping[str, MeshAxes]) -> Iterator[None]:
    """Trace under `mesh` (`jax.set_mesh`: Pallas kernels and the vocabulary-parallel head see it) with
    `rules` (a RULES name or a table) resolving the model's activation constraints. Enter it where the step
    is traced (`lower`), as instit-train and instit-compile do."""
    token = _ACTIVE_RULES.set(RULES[rules] if isinstance(rules, str) else rules)
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE_RULES.reset(token)


def with_logical_constraint(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """x pinned to the layout its logical axis names give under the active `use_mesh` (one name or None
    per dimension); x itself when no mesh or rules are active (one device, inference)."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(logical, x.shape, mesh, rules))


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """A param's path as strings, from an nnx state path (``('layers', 0, ...)``) or a jax key path
    (DictKey / GetAttrKey / SequenceKey entries): ``('layers', '0', ...)``."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def path_key(path: Sequence[Any]) -> str:
    """The one string key of a param path: ``'language_model/layers/0/mlp/gate_proj/kernel'``."""
    return "/".join(path_names(path))


def param_shardings(abstract_state: Any, mesh: Mesh, rules: str | Mapping[str, MeshAxes] = "fsdp") -> Any:
    """NamedShardings for an nnx.State of params (abstract or real), as a pure dict like to_pure_dict()."""
    from flax import nnx

    table = RULES[rules] if isinstance(rules, str) else rules
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
    shapes = nnx.to_pure_dict(abstract_state)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_spec(tuple(spec) if spec else None, x.shape, mesh, table)),
        specs, shapes, is_leaf=lambda s: isinstance(s, PartitionSpec) or s is None,
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch array: B over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways the global batch is split."""
    return _axis_size(mesh, BATCH_AXES)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host numpy batch (this host's rows) -> global jax.Arrays sharded over the batch axes."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, step counters)."""
    return NamedSharding(mesh, PartitionSpec())
