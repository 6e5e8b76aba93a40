"""Layout-free checkpoints: full tensors under canonical names.

    {save}/global_step{N}/
        model.safetensors      model weights in the parameters' dtype, canonical names
        optimizer.safetensors  per parameter: "{name}.master" (fp32 master, when the model is not
                               fp32) and "{name}.{key}" for each optimizer state (exp_avg, ...)
        rng/rank{R}.pt         each rank's Python / NumPy / torch RNG states
        metadata.json          iteration, data position, optimizer step, scheduler, shapes
        configs/               the config files the run started from
    {save}/latest              "global_step{N}": written last and atomically

A weights-only checkpoint (`save_weights_checkpoint`, e.g. a converted Hugging Face model) has
no optimizer file and no RNG states; metadata.json says "weights_only": true.

A checkpoint is built in a hidden temporary folder and renamed when complete, so a crash never
leaves a half-written `global_step{N}`; `latest` moves only after the rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron import mpu
from megatron.utils import atomic_write_json, atomic_write_text

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
METADATA_FILE = "metadata.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the configured model."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


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
            saved_lrs = [group["lr"] for group in self.base.param_groups]
            params = [p for group in self.base.param_groups for p in group["params"]]
            saved_grads = [p.grad for p in params]
            for group in self.base.param_groups:
                group["lr"] = 0.0
            for p in params:
                p.grad = torch.zeros_like(p)
            self.base.step()
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            for group, lr in zip(self.base.param_groups, saved_lrs):
                group["lr"] = lr
        self._link_state_fragments()


def _named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    # named_parameters() lists a tied weight once, under its first (canonical) name.
    return list(module.named_parameters())


def save_checkpoint(
    args,
    iteration: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_state: dict,
) -> Path:
    """Save everything a resume needs; all ranks call it. Returns the checkpoint folder."""
    save_dir = Path(args.save)
    final = save_dir / tag_for(iteration)
    tmp = save_dir / f".{tag_for(iteration)}.tmp"
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()

    named = _named_parameters(module)
    view = OptimizerView(optimizer, [p for _, p in named])
    store_master = any(p.dtype != torch.float32 for _, p in named)
    state_keys = view.state_keys()
    model_tensors, optim_tensors = {}, {}
    for name, p in named:
        master = view.get_master(p)
        states = {key: view.get_state(p, key) for key in state_keys}
        if _rank() == 0:
            model_tensors[name] = p.detach().to("cpu").contiguous()
            if store_master:
                optim_tensors[f"{name}.master"] = master.to("cpu", torch.float32).contiguous()
            for key, value in states.items():
                optim_tensors[f"{name}.{key}"] = value.to("cpu", torch.float32).contiguous()

    torch.save(mpu.get_rng_state(), tmp / "rng" / f"rank{_rank()}.pt")
    if _rank() == 0:
        save_file(model_tensors, tmp / MODEL_FILE, metadata={"format": "strata"})
        save_file(optim_tensors, tmp / OPTIMIZER_FILE, metadata={"format": "strata"})
        metadata = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "optimizer_step": view.get_step(),
            "optimizer_state_keys": state_keys,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "train_state": train_state,
            "shapes": {name: list(t.shape) for name, t in model_tensors.items()},
            "dtype": str(named[0][1].dtype).replace("torch.", ""),
            "layout": {
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "data_parallel_size": mpu.get_data_parallel_world_size(),
                "tensor_parallel_size": mpu.get_tensor_model_parallel_world_size(),
                "pipe_parallel_size": mpu.get_pipe_parallel_world_size(),
            },
        }
        atomic_write_json(tmp / METADATA_FILE, metadata)
        _write_configs(tmp, getattr(args, "config_files", None) or {})
    _barrier()
    if _rank() == 0:
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


def resolve_checkpoint(load: str) -> Path:
    """The folder `{load}/latest` names, checked to be complete; a clear error otherwise."""
    load_dir = Path(load)
    if not load_dir.is_dir():
        raise CheckpointError(f"load: checkpoint directory {load_dir} does not exist")
    latest = load_dir / "latest"
    if not latest.is_file():
        raise CheckpointError(
            f"load: {load_dir} has no 'latest' file naming a checkpoint "
            "(expected {load}/latest holding a tag such as global_step1000)"
        )
    tag = latest.read_text().strip()
    folder = load_dir / tag
    for required in (MODEL_FILE, METADATA_FILE):
        if not (folder / required).is_file():
            raise CheckpointError(
                f"load: checkpoint {folder} (named by {latest}) is incomplete: {required} is missing"
            )
    return folder


def _read_metadata(folder: Path) -> dict:
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"load: cannot read {folder / METADATA_FILE}: {err}") from err
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"load: {folder / METADATA_FILE} has format_version {metadata.get('format_version')}, "
            f"this Strata reads version {FORMAT_VERSION}"
        )
    return metadata


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"load: cannot read {path}: {err}") from err


def check_shapes(named: list[tuple[str, torch.nn.Parameter]], tensors: dict, source: Path) -> None:
    problems = []
    for name, p in named:
        if name not in tensors:
            problems.append(
                f"  {name}: missing from the checkpoint (model expects {list(p.shape)})"
            )
        elif tuple(tensors[name].shape) != tuple(p.shape):
            problems.append(
                f"  {name}: checkpoint has {list(tensors[name].shape)}, model expects {list(p.shape)}"
            )
    expected = {name for name, _ in named}
    unexpected = sorted(k for k in tensors if k not in expected)
    problems += [f"  {name}: in the checkpoint but not in the model" for name in unexpected]
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
    """Load `{args.load}/latest` into the model (and optimizer, scheduler, RNG). Returns the
    metadata, whose `iteration` and `train_state` the caller resumes from."""
    folder = resolve_checkpoint(args.load)
    metadata = _read_metadata(folder)
    named = _named_parameters(module)
    weights = _read_tensors(folder / MODEL_FILE)
    check_shapes(named, weights, folder / MODEL_FILE)
    with torch.no_grad():
        for name, p in named:
            p.data.copy_(weights[name])
    if optimizer is None:
        return metadata

    view = OptimizerView(optimizer, [p for _, p in named])
    optim_tensors = {}
    weights_only = bool(metadata.get("weights_only"))
    if load_optimizer and weights_only:
        raise CheckpointError(
            f"load: {folder} holds model weights only (no optimizer state); load it with "
            "finetune: true (or no_load_optim: true)"
        )
    if load_optimizer:
        if not (folder / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"load: {folder / OPTIMIZER_FILE} is missing")
        optim_tensors = _read_tensors(folder / OPTIMIZER_FILE)
        view.materialize()
    for name, p in named:
        # The fp32 master follows the checkpoint even for weights-only loads, so the optimizer
        # does not step from the freshly initialised values.
        view.set_master(p, optim_tensors.get(f"{name}.master", weights[name].to(torch.float32)))
        if load_optimizer:
            for key in metadata["optimizer_state_keys"]:
                if f"{name}.{key}" not in optim_tensors:
                    raise CheckpointError(f"load: {folder / OPTIMIZER_FILE} lacks {name}.{key}")
                view.set_state(p, key, optim_tensors[f"{name}.{key}"])
    if load_optimizer:
        view.set_step(metadata["optimizer_step"])
        if scheduler is not None and metadata.get("scheduler"):
            scheduler.load_state_dict(metadata["scheduler"])
    if load_rng and not weights_only:
        rng_file = folder / "rng" / f"rank{_rank()}.pt"
        if not rng_file.is_file():
            rng_file = folder / "rng" / "rank0.pt"  # a larger world than the one that saved
        mpu.set_rng_state(torch.load(rng_file, weights_only=False))
    return metadata
