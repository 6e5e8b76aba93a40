"""Loading checkpoints at any layout: each process reads only what it holds (its
tensor-parallel slice of each weight, its fragments of the optimizer states)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron import mpu
from megatron.checkpoint.boxes import TensorParallelSlice, fragment_boxes
from megatron.checkpoint.format import EMBEDDING, CheckpointError, resolve_checkpoint, tensor_files
from megatron.checkpoint.integrity import checksum_problems
from megatron.checkpoint.optimizer_state import MASTER, OptimizerView
from megatron.checkpoint.parameters import (
    canonical_named_parameters,
    is_zero3,
    model_entries,
    tensor_parallel_slice,
    zero3_partition,
)
from megatron.checkpoint.reader import Checkpoint, TensorFiles

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


def read_fragment(
    files: TensorFiles,
    name: str,
    layout: TensorParallelSlice,
    start: int,
    target: torch.Tensor,
) -> None:
    """Set the flat `target` to elements [start, start + numel) of this rank's slice of
    tensor `name`, reading only the pieces that overlap them."""
    values = torch.empty(target.numel(), dtype=target.dtype)
    for placement in fragment_boxes(layout, start, start + target.numel()):
        files.read(name, placement.box, out=placement.view(values))
    target.copy_(values.view(target.shape))


def read_rng_state(path: Path, format_version: int) -> dict:
    """A rank's RNG states, unpickling nothing but tensors and plain values; format 1 stored
    NumPy's state as an array, so only NumPy's array types are allowed in addition."""
    if format_version > 1:
        return torch.load(path, weights_only=True)
    numpy_arrays = [np.dtype, np.dtypes.UInt32DType, np.ndarray, np._core.multiarray._reconstruct]
    with torch.serialization.safe_globals(numpy_arrays):
        return torch.load(path, weights_only=True)


def load_checkpoint(
    args,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> dict:
    """Load `{args.load}/latest` into the model (and optimizer, scheduler, RNG), whatever layout
    saved it. Returns the metadata, whose `iteration` and `train_state` the caller resumes
    from. Every file is checked before anything is set."""
    folder = resolve_checkpoint(args.load, getattr(args, "iteration", None))
    checkpoint = Checkpoint(folder)
    metadata = checkpoint.metadata
    named = canonical_named_parameters(module)
    layouts = {name: tensor_parallel_slice(p) for name, p in named}
    # Checked against the whole model's names (a pipeline stage holds only some).
    entries = model_entries([(name, p.dtype, layouts[name].full_shape) for name, p in named])
    weights_only = bool(metadata.get("weights_only"))
    load_optimizer = load_optimizer and optimizer is not None
    if load_optimizer and weights_only:
        raise CheckpointError(
            f"load: {folder} holds model weights only (no optimizer state); load it with "
            "finetune: true (or no_load_optim: true)"
        )
    if load_optimizer and not tensor_files(metadata, "optimizer"):
        raise CheckpointError(
            f"load: {folder} holds no optimizer state (saved with no_save_optim: true); load it "
            "with no_load_optim: true (or finetune: true)"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = folder / "rng" / f"rank{rank}.pt"
    if not rng_file.is_file():
        rng_file = folder / "rng" / "rank0.pt"  # a larger world than the one that saved
    # Checkpoints saved with no_save_rng leave the RNG as this run seeded it.
    load_rng = load_rng and optimizer is not None and metadata.get("rng", not weights_only)
    if load_rng and not rng_file.is_file():
        raise CheckpointError(f"load: {rng_file} is missing")

    world = dist.get_world_size() if dist.is_initialized() else 1
    if getattr(args, "verify_checkpoint", True):
        problems = checksum_problems(folder, metadata, rank, world)
        if world > 1:  # each rank checked some files: every rank raises the same error
            gathered = [None] * world
            dist.all_gather_object(gathered, problems)
            problems = [problem for found in gathered for problem in found]
        if problems:
            raise CheckpointError("load: " + "; ".join(problems))
    weights = checkpoint.model
    check_shapes({name: shape for name, _, shape in entries}, weights.shapes, folder)
    optim = checkpoint.optimizer if load_optimizer else None
    with torch.no_grad():
        for name, p in named:
            if is_zero3(p):
                start, target = zero3_partition(p, p.ds_tensor.data)
            else:
                start, target = 0, p.data.view(-1)
            read_fragment(weights, name, layouts[name], start, target)
    if optimizer is None:
        return metadata

    view = OptimizerView(optimizer, [p for _, p in named])
    keys: dict[str, list[str]] = {}  # per parameter: its states differ under Muon
    if optim is not None:
        view.materialize()
        keys = {name: view.state_keys(p) for name, p in named}
        missing = [f"{n}.{k}" for n in keys for k in keys[n] if f"{n}.{k}" not in optim]
        if missing:
            raise CheckpointError(
                f"load: {folder} lacks {len(missing)} optimizer tensors "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
    with torch.no_grad():
        for name, p in named:
            # The fp32 master follows the checkpoint even for weights-only loads, so the
            # optimizer does not step from the freshly initialised values.
            master = f"{name}.{MASTER}"
            if optim is not None and master in optim:
                sources = [(optim, master, MASTER)]
            else:
                sources = [(weights, name, MASTER)]
            if optim is not None:
                sources += [(optim, f"{name}.{key}", key) for key in keys[name]]
            for files, tensor, key in sources:
                held = view.fragment(p, key, share_replicas=False)
                if held is not None:
                    read_fragment(files, tensor, layouts[name], *held)
    if load_optimizer:
        view.set_step(metadata["optimizer_step"])
        if scheduler is not None and metadata.get("scheduler"):
            scheduler.load_state_dict(metadata["scheduler"])
    if load_rng:
        mpu.set_rng_state(read_rng_state(rng_file, metadata["format_version"]))
    return metadata
