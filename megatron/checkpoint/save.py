"""Saving checkpoints: every process writes the pieces it holds, rank 0 the metadata.

A checkpoint is built in a hidden temporary folder and renamed when every process has finished
its files, so a crash never leaves a half-written `global_step{N}`; `latest` moves only after
the rename. With ``async_save`` the pieces are copied to CPU memory (the only pause in
training) and written by a background thread; rank 0 publishes the checkpoint once every
process has left its marker in the temporary folder's ``.done/``.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron import mpu
from megatron.checkpoint.boxes import TensorParallelSlice, fragment_boxes, piece_key
from megatron.checkpoint.format import (
    EMBEDDING,
    FORMAT_VERSION,
    METADATA_FILE,
    MODEL_FILE,
    TENSOR_KINDS,
    shard_files,
    tag_for,
)
from megatron.checkpoint.optimizer_state import MASTER, OptimizerView
from megatron.checkpoint.parameters import (
    canonical_named_parameters,
    model_entries,
    tensor_parallel_slice,
    weight_fragment,
    writes_tensor_parallel_copy,
)
from megatron.safetensors_stream import StreamingSafetensorsWriter
from megatron.utils import atomic_write_json, atomic_write_text

DONE = ".done"  # per-process markers of finished files, inside the temporary folder

Pieces = list[tuple[str, torch.Tensor]]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _boxed(
    name: str,
    layout: TensorParallelSlice,
    start: int,
    values: torch.Tensor,
    buffers: dict[str, torch.Tensor] | None,
) -> Pieces:
    """The pieces (key, values) of a flat fragment: views, or copies in CPU memory when given
    ``buffers`` (reused from the previous snapshot: no new pages to fault in)."""
    pieces = []
    for placement in fragment_boxes(layout, start, start + values.numel()):
        key = piece_key(name, placement.box, layout.full_shape)
        data = placement.view(values)
        if buffers is not None:
            buffer = buffers.get(key)
            if buffer is None or buffer.shape != data.shape or buffer.dtype != data.dtype:
                buffer = buffers[key] = torch.empty(data.shape, dtype=data.dtype)
            data = buffer.copy_(data)
        pieces.append((key, data))
    return pieces


@dataclass
class Snapshot:
    """What one process writes: its pieces of each kind of tensor, and its RNG states."""

    folder: Path
    rank: int
    world: int
    pieces: dict[str, Pieces]
    rng: dict
    metadata: dict | None = None  # rank 0's, with the config files it writes
    config_files: dict[str, str] = field(default_factory=dict)

    def write(self) -> None:
        if self.metadata is not None:
            atomic_write_json(self.folder / METADATA_FILE, self.metadata)
            _write_configs(self.folder, self.config_files)
        for kind in TENSOR_KINDS:
            path = self.folder / shard_files(kind, self.world)[self.rank]
            entries = [(key, t.dtype, tuple(t.shape)) for key, t in self.pieces[kind]]
            writer = StreamingSafetensorsWriter(path, entries, {"format": "strata"})
            try:
                for key, values in self.pieces[kind]:
                    writer.write(key, values)
            except BaseException:
                writer.abort()
                raise
            writer.close()
        torch.save(self.rng, self.folder / "rng" / f"rank{self.rank}.pt")


def take_snapshot(
    folder: Path,
    module: torch.nn.Module,
    view: OptimizerView,
    buffers: dict[str, torch.Tensor] | None = None,
) -> Snapshot:
    """This process's pieces: the weights and optimizer states it alone holds (views of the
    live tensors, or copies in CPU ``buffers``)."""
    named = canonical_named_parameters(module, replicas=False)
    store_master = any(p.dtype != torch.float32 for _, p in named)
    suffixes = ([MASTER] if store_master else []) + view.state_keys()
    model: Pieces = []
    optimizer: Pieces = []
    for name, p in named:
        if not writes_tensor_parallel_copy(p):
            continue
        layout = tensor_parallel_slice(p)
        model += _boxed(name, layout, *weight_fragment(p), buffers)
        for key in suffixes:
            held = view.fragment(p, key)
            if held is not None:
                optimizer += _boxed(f"{name}.{key}", layout, *held, buffers)
    return Snapshot(
        folder, _rank(), _world(), {"model": model, "optimizer": optimizer}, mpu.get_rng_state()
    )


def _layout(args) -> dict:
    return {
        "world_size": _world(),
        "data_parallel_size": mpu.get_data_parallel_world_size(),
        "tensor_parallel_size": mpu.get_tensor_model_parallel_world_size(),
        "pipe_parallel_size": mpu.get_pipe_parallel_world_size(),
        "zero_stage": getattr(args, "zero_stage", None) or 0,
    }


@dataclass
class _Pending:
    """An asynchronous save in flight."""

    iteration: int
    folder: Path
    thread: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)
    published: bool = False

    def write(self, snapshot: Snapshot) -> None:
        try:
            snapshot.write()
            atomic_write_text(snapshot.folder / DONE / f"rank{snapshot.rank}", "")
        except BaseException as err:  # reported to the training thread by poll / wait
            self.errors.append(err)


class CheckpointSaver:
    """Saves into ``args.save``; all ranks call ``save`` together. With ``args.async_save``,
    call ``poll`` once per step (rank 0 publishes a finished checkpoint) and ``wait`` before
    the process ends."""

    def __init__(self, args) -> None:
        self.args = args
        self.save_dir = Path(args.save)
        self.asynchronous = bool(getattr(args, "async_save", False))
        self.pending: _Pending | None = None
        self.buffers: dict[str, torch.Tensor] = {}  # the asynchronous snapshot's CPU memory

    def save(
        self,
        iteration: int,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        train_state: dict,
    ) -> Path:
        self.wait()
        tmp = self.save_dir / f".{tag_for(iteration)}.tmp"
        if _rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.save_dir.glob(".global_step*.tmp"):  # left by a crash
                shutil.rmtree(stale)
            (tmp / "rng").mkdir(parents=True)
            (tmp / DONE).mkdir()
        _barrier()
        named = canonical_named_parameters(module, replicas=False)
        view = OptimizerView(optimizer, [p for _, p in named])
        entries = model_entries(
            [(name, p.dtype, tensor_parallel_slice(p).full_shape) for name, p in named]
        )
        snapshot = take_snapshot(tmp, module, view, self.buffers if self.asynchronous else None)
        if _rank() == 0:  # written with the pieces (in the background when asynchronous)
            shapes = {name: list(shape) for name, _, shape in entries}
            snapshot.config_files = getattr(self.args, "config_files", None) or {}
            snapshot.metadata = {
                "format_version": FORMAT_VERSION,
                "iteration": iteration,
                "optimizer_step": view.get_step(),
                "optimizer_state_keys": view.state_keys(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "train_state": train_state,
                "shapes": shapes,
                "padded_vocab_size": shapes[EMBEDDING][0],
                "dtype": str(entries[0][1]).replace("torch.", ""),
                "layout": _layout(self.args),
                "files": {kind: shard_files(kind, _world()) for kind in TENSOR_KINDS},
            }
        if self.asynchronous:
            pending = _Pending(iteration, tmp)
            pending.thread = threading.Thread(
                target=pending.write, args=(snapshot,), name="checkpoint-writer"
            )
            pending.thread.start()
            self.pending = pending
        else:
            snapshot.write()
            _barrier()
            if _rank() == 0:
                self._publish(iteration, tmp)
            _barrier()
        return self.save_dir / tag_for(iteration)

    def poll(self) -> None:
        """Publish a finished asynchronous save (rank 0); raise a writer's error."""
        pending = self.pending
        if pending is None:
            return
        if pending.errors:
            raise pending.errors[0]
        if _rank() == 0 and not pending.published:
            if len(os.listdir(pending.folder / DONE)) == _world():
                self._publish(pending.iteration, pending.folder)
                pending.published = True

    def wait(self) -> None:
        """Finish the asynchronous save in flight (a collective)."""
        pending = self.pending
        if pending is None:
            return
        pending.thread.join()
        if pending.errors:
            raise pending.errors[0]
        _barrier()
        if _rank() == 0 and not pending.published:
            self._publish(pending.iteration, pending.folder)
        _barrier()
        self.pending = None

    def _publish(self, iteration: int, tmp: Path) -> None:
        shutil.rmtree(tmp / DONE, ignore_errors=True)
        publish(self.save_dir, tmp, iteration)
        _prune(self.save_dir, getattr(self.args, "keep_last_n_checkpoints", None))


def save_checkpoint(
    args,
    iteration: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_state: dict,
) -> Path:
    """Save everything a resume needs, synchronously; all ranks call it. Returns the folder."""
    saver = CheckpointSaver(args)
    saver.asynchronous = False
    return saver.save(iteration, module, optimizer, scheduler, train_state)


def _write_configs(folder: Path, config_files: dict[str, str]) -> None:
    (folder / "configs").mkdir()
    for filename, text in config_files.items():
        (folder / "configs" / Path(filename).name).write_text(text)


def publish(save_dir: Path, tmp: Path, iteration: int) -> Path:
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
        "files": {"model": [MODEL_FILE]},
    }
    atomic_write_json(tmp / METADATA_FILE, metadata)
    _write_configs(tmp, config_files or {})
    return publish(save_dir, tmp, iteration)


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
