"""Train a model no process holds whole: FSDP2 over a family's units, each rank filled with its own
rows straight from the safetensors files, and the result written unit by unit.

The model is built with its parameters on the meta device (buffers, such as rotary tables, are real:
they are computed at construction and cost nothing), wrapped with ``fully_shard`` per unit the family
names (``Family.shard_units``) and per root (``Family.shard_roots``), then materialised: every rank
allocates only its shard of every parameter and reads exactly those rows from the files through
``safe_open(...).get_slice``, so the peak host memory of a rank is its share of the model plus one
tensor's rows, never the whole model.

Trainable parameters are fp32 master weights; frozen ones stay in the model dtype; the forward
computes in the model dtype (``MixedPrecisionPolicy(param_dtype=..., reduce_dtype=float32)``), so a
bf16 run's small updates are not rounded away. ``save_sharded`` gathers one unit at a time and the
main rank writes it as one file of the standard sharded layout (``model-0000i-of-0000n.safetensors``
plus ``model.safetensors.index.json``), which ``load_model`` and transformers' ``from_pretrained``
read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from .io import IntegrityError, NonFiniteError, atomic_path, safetensors_header, write_manifest

log = logging.getLogger(__name__)


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with every parameter on the meta device and every buffer real (the buffers a
    model computes at construction, such as rotary tables, are not in its files)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# ---------------------------------------------------------------------------------------------- files
#: safetensors' dtype names
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class WeightFiles:
    """The tensors of a model directory by state-dict name, read lazily, a row range at a time.

    ``layout``: ``Family.weight_layout``: a tensor named ``prefix + key`` is ``key`` (renamed as
    the part says) of a ``*.safetensors`` file in that part's sub-directory. Rows are read with
    plain file reads into a tensor of their size, not through a memory map, so a rank's resident
    memory holds what it keeps and nothing of the files (the page cache is not its memory)."""

    def __init__(self, model_dir, layout):
        self.model_dir = Path(model_dir)
        self.entries: dict[str, tuple[Path, str, tuple, str]] = {}
        self._where: dict[str, tuple[int, torch.dtype]] = {}
        for prefix, sub, _, renames in layout:
            for path in sorted((self.model_dir / sub).glob("*.safetensors")):
                safetensors_header(path)  # validated (shapes, dtypes, offsets) before any read
                for key, (shape, dtype_name, offset) in _tensor_places(path).items():
                    name = prefix + renamed(key, [(b, a) for a, b in renames])
                    if name in self.entries:
                        raise IntegrityError(f"{self.model_dir}: tensor {name} is stored twice")
                    self.entries[name] = (path, key, shape, dtype_name)
                    self._where[name] = (offset, SAFETENSORS_DTYPES[dtype_name])

    def check(self, expected: dict[str, tuple]) -> None:
        """Every expected tensor stored once with its shape, nothing else stored (the strictness of
        ``io.check_weights_match``)."""
        from .io import weight_mismatches

        problems = weight_mismatches({k: v[2] for k, v in self.entries.items()}, expected)
        if problems:
            raise IntegrityError(f"{self.model_dir}: weights do not match the model's config: " + "; ".join(problems))

    def rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of tensor ``name``, read from disk alone (the whole tensor when
        both are None, or when it has no dimensions)."""
        path, _, shape, _ = self.entries[name]
        offset, dtype = self._where[name]
        if not shape or start is None:
            start, stop = 0, shape[0] if shape else 1
        row = math.prod(shape[1:]) if shape else 1
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype)
        if out.numel():
            size = torch.tensor([], dtype=dtype).element_size()
            with open(path, "rb") as f:
                f.seek(offset + start * row * size)
                if f.readinto(memoryview(out.view(torch.uint8).numpy()).cast("B")) != out.numel() * size:
                    raise IntegrityError(f"{path}: tensor {name} is truncated")
        return out


def stored_float_dtype(directory, pattern: str = "*.safetensors") -> torch.dtype:
    """The dtype of the first floating tensor in the ``pattern`` files of ``directory`` (the dtype a
    model directory was saved in); ``FileNotFoundError`` if there is none."""
    from .io import FLOAT_DTYPES

    for path in sorted(Path(directory).glob(pattern)):
        for _, stored in safetensors_header(path).values():
            if stored in FLOAT_DTYPES and stored in SAFETENSORS_DTYPES:
                return SAFETENSORS_DTYPES[stored]
    raise FileNotFoundError(f"{directory} holds no floating-point .safetensors weights")


def _tensor_places(path: Path) -> dict[str, tuple[tuple, str, int]]:
    """Each tensor's shape, dtype name and byte offset in a safetensors file (from its header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out = {}
    for key, entry in header.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise IntegrityError(f"{path}: tensor {key} has dtype {entry['dtype']}, which cannot be read")
        out[key] = (tuple(entry["shape"]), entry["dtype"], 8 + n + int(entry["data_offsets"][0]))
    return out


def streamed_state_digest(model, source: WeightFiles, world, device, dtype) -> str:
    """``io.state_digest`` of the model the files hold, in the dtypes of ``model`` (a sharded or
    meta model; floating tensors in ``dtype``, as a model loaded whole in it), computed by the main
    rank one tensor at a time and sent to the others: the same identity as the model loaded whole,
    so checkpoints resume across both paths."""
    import torch.distributed as dist

    from .io import state_digest_of

    digest = b"\0" * 64
    if world.is_main:
        dtypes = {n: dtype if t.is_floating_point() else t.dtype for n, t in model.state_dict().items()}
        rows = ((n, source.rows(n).to(dtypes[n])) for n in sorted(dtypes))
        digest = state_digest_of(model, rows).encode()
    if world.sharded:
        buffer = torch.tensor(list(digest), dtype=torch.uint8, device=device)
        dist.broadcast(buffer, 0)
        digest = bytes(buffer.cpu().tolist())
    return digest.decode()


def renamed(key: str, renames) -> str:
    """``key`` with the first matching ``(from prefix, to prefix)`` of ``renames`` applied."""
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def local_rows(tensor: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)``: the rows (dim 0) of the global tensor this rank holds (all of them for a
    tensor that is not sharded; FSDP2 shards dim 0 in ``torch.chunk`` pieces)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor) or tensor.dim() == 0:
        return 0, tensor.shape[0] if tensor.dim() else 0
    (placement,) = tensor.placements
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise ValueError(f"only dim-0 sharding is supported, not {tensor.placements}")
    n, size = tensor.shape[0], tensor.device_mesh.size()
    rank = tensor.device_mesh.get_local_rank()
    chunk = -(-n // size)
    start = min(n, rank * chunk)
    stop = min(n, start + chunk)
    if tensor.to_local().shape[0] != stop - start:
        raise AssertionError(f"FSDP2 shard of {tuple(tensor.shape)} on rank {rank} is not rows {start}:{stop}")
    return start, stop


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a possibly sharded tensor, as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# -------------------------------------------------------------------------------------------- shard
def mixed_precision(model_dtype: torch.dtype, master_dtype: torch.dtype):
    """FSDP2's policy: compute in the model dtype, reduce gradients in fp32 (nothing to do in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if model_dtype == master_dtype:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=model_dtype, reduce_dtype=torch.float32)


def checkpoint_activations(unit: nn.Module) -> None:
    """Recompute ``unit``'s activations in backward instead of keeping them (its parameter names
    stay as they are, unlike a wrapper module)."""
    from torch.utils.checkpoint import checkpoint

    forward = unit.forward

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    unit.forward = recomputed


def _set_dtypes(model: nn.Module, trainable: set[str], model_dtype, master_dtype) -> None:
    """Frozen floating parameters in the model dtype, trainable ones in the master dtype (on meta:
    nothing is allocated)."""
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            grad = full in trainable
            dtype = (master_dtype if grad else model_dtype) if p.is_floating_point() else p.dtype
            module._parameters[name] = nn.Parameter(p.to(dtype), requires_grad=grad)


def shard(family, trainable, device, model_dtype, master_dtype=torch.float32, activation_checkpointing=False,
          source: WeightFiles | None = None, state: dict | None = None):  # fmt: skip
    """``family.model`` sharded in place over the process group (its parameters on meta, or real:
    then ``state`` defaults to its own state dict) and filled from ``source`` (the files) or
    ``state`` (full tensors in memory: library use). Returns the sharded model."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    model = family.model
    if source is None and state is None:
        state = {k: v.detach() for k, v in model.state_dict().items()}
    trainable = set(trainable)
    _to_meta(model)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    _set_dtypes(model, trainable, model_dtype, master_dtype)
    policy = mixed_precision(model_dtype, master_dtype)
    for unit in family.shard_units():
        if activation_checkpointing:
            checkpoint_activations(unit)
        fully_shard(unit, mp_policy=policy)
    for root, methods in family.shard_roots():
        fully_shard(root, mp_policy=policy)
        for method in methods:
            register_fsdp_forward_method(root, method)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
        _fill(model, source, state, device)
    return model


def _to_meta(model: nn.Module) -> None:
    """Parameters that are still real go to meta (their values are in ``state``)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type != "meta":
                module._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)


def _fill(model: nn.Module, source: WeightFiles | None, state: dict | None, device) -> None:
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if source is not None:
        source.check(expected)
    persistent = set(expected)
    for name, tensor in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in persistent]:
        start, stop = local_rows(tensor)
        if source is not None:
            rows = source.rows(name, start, stop) if tensor.dim() else source.rows(name)
        else:
            rows = state[name][start:stop] if tensor.dim() else state[name]
        local_part(tensor).copy_(rows.to(device=device, dtype=tensor.dtype))


def sharded_twin(family, trainable: set[str], device, master_dtype=torch.float32, activation_checkpointing=False):
    """A copy of ``family.model`` sharded with FSDP2 over the process group, filled from the model
    in memory (library use; the CLI builds the sharded model from the files, ``shard``):
    trainable parameters in ``master_dtype``, frozen ones in the model's dtype."""
    import copy

    model = family.model
    memo = {id(p): nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    twin = copy.deepcopy(model, memo)
    model_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return shard(family.with_model(twin), trainable, device, model_dtype, master_dtype, activation_checkpointing,
                 state=state)  # fmt: skip


def all_finite(params: dict, names) -> list[str]:
    """Names of the trained tensors holding a non-finite value on any rank (each rank checks its
    own shard; the flags are summed over the group)."""
    import torch.distributed as dist

    flags = torch.tensor([0.0 if bool(torch.isfinite(local_part(params[n].detach())).all()) else 1.0 for n in names])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags)
    return [n for n, f in zip(names, flags.tolist()) if f > 0]


# --------------------------------------------------------------------------------------------- save
def save_sharded(family, out_dir, world, dtype=None, extra_files=()) -> dict:
    """Write ``family``'s sharded model as a model directory without gathering it: one unit
    (``shard_units``) at a time, then what the roots hold directly, each one file of the standard
    sharded layout per sub-directory of ``Family.weight_layout``, in ``dtype`` (None: each
    parameter's own; fp32 masters are written in the model dtype by the caller's choice). Every rank
    takes part in the gathers; the main rank writes. Returns the files written, the largest group's
    bytes and this rank's resident memory before and at most while saving (MB)."""
    from safetensors.torch import save_file

    from .distributed import full_tensor

    model = family.model
    state = model.state_dict()
    layout = family.weight_layout()
    groups = unit_groups(family, state)
    result = {"files": 0, "peak_group_bytes": 0, "rss_before_mb": resident_mb(), "rss_peak_mb": resident_mb()}
    context = atomic_path(out_dir, is_dir=True) if world.is_main else contextlib.nullcontext(None)
    with context as tmp:
        for prefix, sub, stem, renames in layout:
            mine = [g for g in groups if g and g[0].startswith(prefix)]
            weight_map, total = {}, 0
            for i, names in enumerate(mine, 1):
                file = f"{stem}-{i:05d}-of-{len(mine):05d}.safetensors"
                tensors = {}
                for name in names:
                    t = full_tensor(state[name].detach())
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    tensors[renamed(name[len(prefix) :], renames)] = t.cpu().contiguous()
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                result["peak_group_bytes"] = max(result["peak_group_bytes"], size)
                result["rss_peak_mb"] = max(result["rss_peak_mb"], resident_mb())  # the group gathered: its peak
                if world.is_main:
                    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
                    if bad:
                        raise NonFiniteError(f"model for {out_dir}: non-finite values in {bad[:4]}; nothing was saved")
                    (tmp / sub).mkdir(parents=True, exist_ok=True)
                    save_file(tensors, str(tmp / sub / file), metadata={"format": "pt"})
                    weight_map.update({k: file for k in tensors})
                    total += size
                    result["files"] += 1
                del tensors
            if world.is_main:
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / sub / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if world.is_main:
            family.save_metadata(tmp)
            import shutil

            for path in extra_files:
                shutil.copyfile(path, tmp / Path(path).name)
            write_manifest(tmp)
    world.barrier()
    return result


def resident_mb() -> float:
    """This process's resident memory now, MB (Linux ``/proc``; 0 elsewhere)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def unit_groups(family, state: dict) -> list[list[str]]:
    """The state-dict names of each unit (``shard_units``), in order, then the rest per root prefix:
    the groups ``save_sharded`` gathers one at a time."""
    groups, seen = [], set()
    module_names = {id(m): n for n, m in family.model.named_modules()}
    for unit in family.shard_units():
        prefix = module_names[id(unit)] + "."
        group = [n for n in state if n.startswith(prefix)]
        groups.append(group)
        seen.update(group)
    for prefix, *_ in family.weight_layout():
        rest = [n for n in state if n not in seen and n.startswith(prefix)]
        seen.update(rest)
        if rest:
            groups.append(rest)
    return groups
