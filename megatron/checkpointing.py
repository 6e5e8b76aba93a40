"""Layout-free checkpoints: full tensors under canonical names (the files:
megatron/checkpoint/format.py).

A weights-only checkpoint (`save_weights_checkpoint`, e.g. a converted Hugging Face model) has
no optimizer file and no RNG states; metadata.json says "weights_only": true.

A checkpoint is built in a hidden temporary folder and renamed when complete, so a crash never
leaves a half-written `global_step{N}`; `latest` moves only after the rename.
"""

from __future__ import annotations

import os
import re
import shutil
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron import mpu
from megatron.checkpoint.format import (
    EMBEDDING,
    FORMAT_VERSION,
    METADATA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    read_metadata,
    resolve_checkpoint,
    tag_for,
)
from megatron.model.pipeline_checkpoint import pipeline_entries, to_first_rank
from megatron.mpu.layers import merge_partitions, split_partition
from megatron.safetensors_stream import StreamingSafetensorsWriter
from megatron.utils import atomic_write_json, atomic_write_text


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class OptimizerView:
    """Full-tensor access to each parameter's fp32 master and optimizer state, whatever wrapper
    DeepSpeed put around the optimizer (ZeRO partitions, an fp32 copy, or none).

    Under ZeRO the getters are collectives: every rank must call them in the same order.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
        self.wrapper = optimizer
        self.base = getattr(optimizer, "optimizer", optimizer)
        self.partitioned = any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in params)
        self.master_of: dict[torch.nn.Parameter, torch.Tensor] = {}
        if not self.partitioned:
            lp_groups = getattr(optimizer, "fp16_groups", None)
            hp_groups = getattr(optimizer, "fp32_groups", None)
            if lp_groups is not None and hp_groups is not None:
                for lp_group, hp_group in zip(lp_groups, hp_groups):
                    self.master_of.update(zip(lp_group, hp_group))
            for p in params:
                self.master_of.setdefault(p, p)
        self._link_state_fragments()

    def _link_state_fragments(self) -> None:
        # DeepSpeed links each parameter's view into the flat optimizer state once, right after
        # the first param group's first step, so groups stepped later are never linked; relink.
        if (
            self.partitioned
            and self.base.state
            and hasattr(self.wrapper, "_hp_optimizer_states_linked")
        ):
            self.wrapper._hp_optimizer_states_linked = False
            self.wrapper._lazy_init_hp_params_optimizer_state()

    def state_keys(self) -> list[str]:
        for state in self.base.state.values():
            return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.ndim > 0)
        return []

    def get_master(self, p: torch.nn.Parameter) -> torch.Tensor:
        if self.partitioned:
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(p)
        return self.master_of[p].detach()

    def set_master(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        if self.partitioned:
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(p, value.to(torch.float32))
        else:
            self.master_of[p].data.copy_(value)

    def get_state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor:
        if self.partitioned:
            from deepspeed.utils import safe_get_full_optimizer_state

            return safe_get_full_optimizer_state(p, key)
        return self.base.state[self.master_of[p]][key]

    def set_state(self, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
        if self.partitioned:
            from deepspeed.utils import safe_set_full_optimizer_state

            safe_set_full_optimizer_state(p, value, key)
        else:
            self.base.state[self.master_of[p]][key].copy_(value)

    def get_step(self) -> int:
        for state in self.base.state.values():
            step = state.get("step", 0)
            return int(step.item() if torch.is_tensor(step) else step)
        return 0

    def set_step(self, step: int) -> None:
        for state in self.base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"].fill_(step)
            elif "step" in state:
                state["step"] = step

    def materialize(self) -> None:
        """Create the optimizer state (lazily made on the first step) without changing weights:
        one step with zero gradients at learning rate 0."""
        if not self.base.state:
            groups = self.base.param_groups
            saved = [(group["params"], group["lr"]) for group in groups]
            step_params = self._step_params()
            for group, params in zip(groups, step_params):
                group["params"], group["lr"] = params, 0.0
            params = [p for group_params in step_params for p in group_params]
            saved_grads = [p.grad for p in params]
            for p in params:
                p.grad = torch.zeros_like(p)
            self.base.step()
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            for group, (group_params, lr) in zip(groups, saved):
                group["params"], group["lr"] = group_params, lr
        self._link_state_fragments()

    def _step_params(self) -> list[list[torch.Tensor]]:
        """Per param group of the base optimizer, the tensors a step updates. ZeRO-3 hands it
        each sub-group's flat fp32 partition only for the duration of that sub-group's step."""
        flats = getattr(self.wrapper, "fp32_partitioned_groups_flat", None)
        if flats is None:
            return [list(group["params"]) for group in self.base.param_groups]
        per_group: list[list[torch.Tensor]] = [[] for _ in self.base.param_groups]
        for sub_group, flat in enumerate(flats):
            per_group[self.wrapper.sub_group_to_group_id[sub_group]].append(flat)
        return per_group


def canonical_named_parameters(
    module: torch.nn.Module, replicas: bool = True
) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) for each parameter this process holds: the names of
    GPTModel(config).state_dict() at TP=1. The one place where an engine's module names are
    mapped to canonical names. named_parameters() lists a tied weight once, under its first
    (canonical) name; a pipeline stage maps DeepSpeed's names (megatron/engine/pipeline.py), and
    ``replicas=False`` leaves out the last stage's copy of a tied embedding."""
    pipeline_names = getattr(module, "canonical_named_parameters", None)
    if pipeline_names is not None:
        return pipeline_names(replicas)
    return list(module.named_parameters())


def _full_state(view: OptimizerView, key: str, p: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 optimizer value `key` ("master" or a state key) of `p`."""
    local = view.get_master(p) if key == "master" else view.get_state(p, key)
    return gather_tensor_parallel(p, local.to(torch.float32))


def _to_writer(p, value, stage: int, shape: tuple[int, ...], dtype: torch.dtype):
    """`value(p)` (collective within the pipeline stage holding `p`; None on the others),
    delivered to global rank 0, which writes it."""
    return to_first_rank(value(p) if p is not None else None, stage, shape, dtype)


def _zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _tp_split(p: torch.nn.Parameter) -> bool:
    return (
        getattr(p, "partition_dim", None) is not None
        and mpu.get_tensor_model_parallel_world_size() > 1
    )


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's shape at TP=1 without ZeRO-3 partitioning."""
    shape = list(p.ds_shape if _zero3(p) else p.shape)
    if _tp_split(p):
        shape[p.partition_dim] *= mpu.get_tensor_model_parallel_world_size()
    return tuple(shape)


def gather_tensor_parallel(p: torch.nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """The full tensor from each tensor-parallel rank's `local` slice of parameter `p` (a
    collective over the tensor-parallel group); `local` itself when `p` is not split."""
    if not _tp_split(p):
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local, group=mpu.get_tensor_model_parallel_group())
    return merge_partitions(
        parts,
        p.partition_dim,
        getattr(p, "partition_stride", 1),
        getattr(p, "partition_order", None),
    )


def slice_tensor_parallel(p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full tensor for parameter `p`."""
    if not _tp_split(p):
        return full
    return split_partition(
        full,
        p.partition_dim,
        mpu.get_tensor_model_parallel_world_size(),
        mpu.get_tensor_model_parallel_rank(),
        getattr(p, "partition_stride", 1),
        getattr(p, "partition_order", None),
    )


def full_weight(p: torch.nn.Parameter) -> torch.Tensor:
    """The full (TP=1, ZeRO-3 gathered) value of `p`; a collective: all ranks call it."""
    if _zero3(p):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters([p]):
            local = p.data.detach().clone()
    else:
        local = p.detach()
    return gather_tensor_parallel(p, local)


def set_full_weight(p: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Set `p` from its full value; a collective under ZeRO-3."""
    local = slice_tensor_parallel(p, full)
    if _zero3(p):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        # Every rank holds the same full tensor; rank 0's copy is re-partitioned on exit.
        with GatheredParameters([p], modifier_rank=0):
            p.data.copy_(local)
    else:
        p.data.copy_(local)


def _layout(args) -> dict:
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "data_parallel_size": mpu.get_data_parallel_world_size(),
        "tensor_parallel_size": mpu.get_tensor_model_parallel_world_size(),
        "pipe_parallel_size": mpu.get_pipe_parallel_world_size(),
        "zero_stage": getattr(args, "zero_stage", None) or 0,
    }


def save_checkpoint(
    args,
    iteration: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_state: dict,
) -> Path:
    """Save everything a resume needs; all ranks call it. Returns the checkpoint folder.

    Streams: one parameter at a time is gathered to its full value (ZeRO partitions and
    tensor-parallel slices) and rank 0 appends it to the files, so the extra memory is about
    one parameter (plus its optimizer states) whatever the model size."""
    save_dir = Path(args.save)
    final = save_dir / tag_for(iteration)
    tmp = save_dir / f".{tag_for(iteration)}.tmp"
    writing = _rank() == 0
    if writing:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()

    named = canonical_named_parameters(module, replicas=False)
    local = dict(named)
    view = OptimizerView(optimizer, [p for _, p in named])
    store_master = any(p.dtype != torch.float32 for _, p in named)
    state_keys = view.state_keys()
    suffixes = (["master"] if store_master else []) + state_keys
    # The whole model's tensors in order, each with the pipeline stage holding it.
    entries = pipeline_entries([(name, p.dtype, full_shape(p)) for name, p in named])
    shapes = {name: shape for name, _, shape, _ in entries}
    optim_entries = [
        (f"{name}.{s}", torch.float32, shape) for name, _, shape, _ in entries for s in suffixes
    ]
    if writing:
        model_out = StreamingSafetensorsWriter(
            tmp / MODEL_FILE, [entry[:3] for entry in entries], {"format": "strata"}
        )
        optim_out = StreamingSafetensorsWriter(
            tmp / OPTIMIZER_FILE, optim_entries, {"format": "strata"}
        )
    for name, dtype, shape, stage in entries:
        p = local.get(name)  # None on the other pipeline stages
        weight = _to_writer(p, full_weight, stage, shape, dtype)
        if writing:
            model_out.write(name, weight)
        del weight
        for key in suffixes:
            value = _to_writer(p, partial(_full_state, view, key), stage, shape, torch.float32)
            if writing:
                optim_out.write(f"{name}.{key}", value)

    torch.save(mpu.get_rng_state(), tmp / "rng" / f"rank{_rank()}.pt")
    if writing:
        model_out.close()
        optim_out.close()
        metadata = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "optimizer_step": view.get_step(),
            "optimizer_state_keys": state_keys,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "train_state": train_state,
            "shapes": {name: list(shape) for name, shape in shapes.items()},
            "padded_vocab_size": shapes[EMBEDDING][0],
            "dtype": str(named[0][1].dtype).replace("torch.", ""),
            "layout": _layout(args),
        }
        atomic_write_json(tmp / METADATA_FILE, metadata)
        _write_configs(tmp, getattr(args, "config_files", None) or {})
    _barrier()
    if writing:
        _publish(save_dir, tmp, iteration)
        _prune(save_dir, getattr(args, "keep_last_n_checkpoints", None))
    _barrier()
    return final


def _write_configs(folder: Path, config_files: dict[str, str]) -> None:
    (folder / "configs").mkdir()
    for filename, text in config_files.items():
        (folder / "configs" / Path(filename).name).write_text(text)


def _publish(save_dir: Path, tmp: Path, iteration: int) -> Path:
    """Rename the finished temporary folder to global_step{N}, then point `latest` at it."""
    final = save_dir / tag_for(iteration)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(save_dir / "latest", tag_for(iteration))
    return final


def save_weights_checkpoint(
    save_dir: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config_files: dict[str, str] | None = None,
    iteration: int = 0,
) -> Path:
    """A checkpoint holding only model weights (e.g. a converted Hugging Face model), in the
    same format; load it with `finetune: true` or `no_load_optim: true`. One process only."""
    save_dir = Path(save_dir)
    tmp = save_dir / f".{tag_for(iteration)}.tmp"
    save_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, tmp / MODEL_FILE, metadata={"format": "strata"})
    metadata = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "weights_only": True,
        "optimizer_step": 0,
        "optimizer_state_keys": [],
        "scheduler": None,
        "train_state": {},
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        "padded_vocab_size": tensors[EMBEDDING].shape[0],
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        "layout": {
            "world_size": 1,
            "data_parallel_size": 1,
            "tensor_parallel_size": 1,
            "pipe_parallel_size": 1,
        },
    }
    atomic_write_json(tmp / METADATA_FILE, metadata)
    _write_configs(tmp, config_files or {})
    return _publish(save_dir, tmp, iteration)


def _prune(save_dir: Path, keep_last: int | None) -> None:
    if not keep_last or keep_last <= 0:
        return
    steps = sorted(
        (int(m.group(1)), path)
        for path in save_dir.iterdir()
        if (m := re.fullmatch(r"global_step(\d+)", path.name)) and path.is_dir()
    )
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"load: cannot read {path}: {err}") from err


def _open_tensors(path: Path):
    """A lazy safetensors reader: tensors are read one at a time, when asked for."""
    if not path.is_file():
        raise CheckpointError(f"load: {path} is missing")
    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"load: cannot read {path}: {err}") from err


def _shapes_in(handle) -> dict[str, tuple[int, ...]]:
    return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


# Tensors with a row per entry of the padded vocabulary.
VOCAB_ROW_TENSORS = (EMBEDDING, "lm_head.weight")


def check_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: Path
) -> None:
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"  {name}: missing from the checkpoint (model expects {list(shape)})")
        elif tuple(found[name]) != tuple(shape):
            problems.append(
                f"  {name}: checkpoint has {list(found[name])}, model expects {list(shape)}"
            )
            if name in VOCAB_ROW_TENSORS and tuple(found[name][1:]) == tuple(shape[1:]):
                problems.append(
                    "    (the padded vocabulary is a multiple of make_vocab_size_divisible_by x "
                    f"model_parallel_size: pick a make_vocab_size_divisible_by that pads to "
                    f"{found[name][0]} rows in this layout)"
                )
    problems += [
        f"  {name}: in the checkpoint but not in the model"
        for name in sorted(found)
        if name not in expected
    ]
    if problems:
        raise CheckpointError(
            f"load: {source} does not match the configured model:\n" + "\n".join(problems)
        )


def load_checkpoint(
    args,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> dict:
    """Load `{args.load}/latest` into the model (and optimizer, scheduler, RNG), whatever layout
    saved it: each full tensor is read on its own and sliced for this rank (tensor-parallel
    slices; ZeRO partitions through DeepSpeed). Returns the metadata, whose `iteration` and
    `train_state` the caller resumes from. Every file is checked before anything is set."""
    folder = resolve_checkpoint(args.load)
    metadata = read_metadata(folder)
    named = canonical_named_parameters(module)
    shapes = {name: full_shape(p) for name, p in named}
    # Checked against the whole model's names (a pipeline stage holds only some).
    entries = pipeline_entries([(name, p.dtype, shapes[name]) for name, p in named])
    expected = {name: shape for name, _, shape, _ in entries}
    weights_only = bool(metadata.get("weights_only"))
    load_optimizer = load_optimizer and optimizer is not None
    if load_optimizer and weights_only:
        raise CheckpointError(
            f"load: {folder} holds model weights only (no optimizer state); load it with "
            "finetune: true (or no_load_optim: true)"
        )
    rng_file = folder / "rng" / f"rank{_rank()}.pt"
    if not rng_file.is_file():
        rng_file = folder / "rng" / "rank0.pt"  # a larger world than the one that saved
    load_rng = load_rng and optimizer is not None and not weights_only
    if load_rng and not rng_file.is_file():
        raise CheckpointError(f"load: {rng_file} is missing")

    weights = _open_tensors(folder / MODEL_FILE)
    check_shapes(expected, _shapes_in(weights), folder / MODEL_FILE)
    optim = _open_tensors(folder / OPTIMIZER_FILE) if load_optimizer else None
    if optim is not None:
        found = set(optim.keys())
        keys = metadata["optimizer_state_keys"]
        missing = [f"{n}.{k}" for n in shapes for k in keys if f"{n}.{k}" not in found]
        if missing:
            raise CheckpointError(
                f"load: {folder / OPTIMIZER_FILE} lacks {len(missing)} optimizer tensors "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
    with torch.no_grad():
        for name, p in named:
            set_full_weight(p, weights.get_tensor(name))
    if optimizer is None:
        return metadata

    view = OptimizerView(optimizer, [p for _, p in named])
    if optim is not None:
        view.materialize()
    masters = set(optim.keys()) if optim is not None else set()
    for name, p in named:
        # The fp32 master follows the checkpoint even for weights-only loads, so the optimizer
        # does not step from the freshly initialised values.
        if f"{name}.master" in masters:
            master = optim.get_tensor(f"{name}.master")
        else:
            master = weights.get_tensor(name).to(torch.float32)
        view.set_master(p, slice_tensor_parallel(p, master))
        if optim is not None:
            for key in metadata["optimizer_state_keys"]:
                view.set_state(p, key, slice_tensor_parallel(p, optim.get_tensor(f"{name}.{key}")))
    if load_optimizer:
        view.set_step(metadata["optimizer_step"])
        if scheduler is not None and metadata.get("scheduler"):
            scheduler.load_state_dict(metadata["scheduler"])
    if load_rng:
        mpu.set_rng_state(torch.load(rng_file, weights_only=False))
    return metadata
