"""Saving checkpoints: every process writes the pieces it holds, rank 0 the metadata.

A checkpoint is built in a hidden temporary folder and renamed when every process has finished
its files, so a crash never leaves a half-written `global_step{N}`; `latest` moves only after
the rename. With ``async_save`` the pieces are copied to CPU memory (the only pause in
training) and written by a background thread; rank 0 publishes the checkpoint once every
process has left its marker in the temporary folder's ``.done/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
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
    OPTIMIZER_FILE,
    CheckpointError,
    shard_files,
    tag_for,
)
from megatron.checkpoint.integrity import file_sha256
from megatron.checkpoint.optimizer_state import MASTER, OptimizerView
from megatron.checkpoint.parameters import (
    canonical_named_parameters,
    full_shape,
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
    pieces: dict[str, Pieces]  # by kind of tensor file: "model", and "optimizer" if saved
    rng: dict | None  # None: not saved (no_save_rng)

    def write(self) -> dict[str, str]:
        """Write this process's files; their sha256 by path in the checkpoint folder."""
        digests = {}
        for kind in self.pieces:
            name = shard_files(kind, self.world)[self.rank]
            entries = [(key, t.dtype, tuple(t.shape)) for key, t in self.pieces[kind]]
            writer = StreamingSafetensorsWriter(self.folder / name, entries, {"format": "strata"})
            try:
                for key, values in self.pieces[kind]:
                    writer.write(key, values)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            digests[name] = writer.sha256
        if self.rng is not None:
            buffer = io.BytesIO()
            torch.save(self.rng, buffer)
            rng_file = f"rng/rank{self.rank}.pt"
            digests[rng_file] = _write_bytes(self.folder / rng_file, buffer.getvalue())
        return digests


def _write_bytes(path: Path, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(data).hexdigest()


def _attempt(work) -> tuple[object, str | None]:
    """(result, None), or (None, what went wrong) when the file system refuses (a full disk,
    a file size limit, permissions)."""
    try:
        return work(), None
    except OSError as err:
        return None, f"{getattr(err, 'filename', None) or ''}: {err.strerror or err}".lstrip(": ")


def take_snapshot(
    folder: Path,
    module: torch.nn.Module,
    view: OptimizerView,
    buffers: dict[str, torch.Tensor] | None = None,
    optimizer_state: bool = True,
    rng: bool = True,
) -> Snapshot:
    """This process's pieces: the weights and (unless ``optimizer_state`` is false) optimizer
    states it alone holds, as views of the live tensors or copies in CPU ``buffers``; its RNG
    states unless ``rng`` is false."""
    named = canonical_named_parameters(module, replicas=False)
    store_master = any(p.dtype != torch.float32 for _, p in named)
    masters = [MASTER] if store_master else []
    model: Pieces = []
    optimizer: Pieces = []
    for name, p in named:
        if not writes_tensor_parallel_copy(p):
            continue
        layout = tensor_parallel_slice(p)
        model += _boxed(name, layout, *weight_fragment(p), buffers)
        for key in masters + view.state_keys(p) if optimizer_state else []:
            held = view.fragment(p, key)
            if held is not None:
                optimizer += _boxed(f"{name}.{key}", layout, *held, buffers)
    pieces = {"model": model, "optimizer": optimizer} if optimizer_state else {"model": model}
    return Snapshot(folder, _rank(), _world(), pieces, mpu.get_rng_state() if rng else None)


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
    """An asynchronous save in flight: its writer thread leaves `.done/rank{R}` holding its
    files' digests, or `.done/rank{R}.error` saying why it could not."""

    iteration: int
    folder: Path
    metadata: dict | None
    thread: threading.Thread | None = None
    error: BaseException | None = None  # not a file-system refusal: a bug, raised as is
    finished: bool = False  # published or given up (rank 0)

    def write(self, snapshot: Snapshot) -> None:
        try:
            digests, refusal = _attempt(snapshot.write)
            marker = self.folder / DONE / f"rank{snapshot.rank}"
            if refusal is None:
                atomic_write_json(marker, digests)
            else:
                marker.with_suffix(".error").write_text(refusal)
        except BaseException as err:
            self.error = err


class CheckpointSaver:
    """Saves into ``args.save``; all ranks call ``save`` together. With ``args.async_save``,
    call ``poll`` once per step (rank 0 publishes a finished checkpoint) and ``wait`` before
    the process ends.

    A file system that refuses a write (full, or a file size limit) fails the save on every
    rank with one CheckpointError naming the file; the partial folder is removed and `latest`
    still names the previous checkpoint."""

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
        entries = model_entries([(name, p.dtype, full_shape(p)) for name, p in named])
        snapshot = take_snapshot(
            tmp,
            module,
            view,
            self.buffers if self.asynchronous else None,
            optimizer_state=not getattr(self.args, "no_save_optim", False),
            rng=not getattr(self.args, "no_save_rng", False),
        )
        metadata = None
        if _rank() == 0:  # written last, with every file's digest
            shapes = {name: list(shape) for name, _, shape in entries}
            metadata = {
                "format_version": FORMAT_VERSION,
                "iteration": iteration,
                "optimizer_step": view.get_step(),
                "optimizer_state_keys": view.state_keys() if "optimizer" in snapshot.pieces else [],
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "train_state": train_state,
                "shapes": shapes,
                "padded_vocab_size": shapes[EMBEDDING][0],
                "dtype": str(entries[0][1]).replace("torch.", ""),
                "layout": _layout(self.args),
                "files": {kind: shard_files(kind, _world()) for kind in snapshot.pieces},
                "rng": snapshot.rng is not None,
            }
        if self.asynchronous:
            pending = _Pending(iteration, tmp, metadata)
            pending.thread = threading.Thread(
                target=pending.write, args=(snapshot,), name="checkpoint-writer"
            )
            pending.thread.start()
            self.pending = pending
        else:
            digests, refusal = _attempt(snapshot.write)
            outcomes = _all_gather((digests, refusal))
            refusals = [(r, why) for r, (_, why) in enumerate(outcomes) if why]
            if not refusals and _rank() == 0:
                merged = {name: d for files, _ in outcomes for name, d in files.items()}
                _, why = _attempt(lambda: self._publish(iteration, tmp, metadata, merged))
                refusals = [(0, why)] if why else []
            self._raise_if_refused(iteration, tmp, _broadcast(refusals))
        return self.save_dir / tag_for(iteration)

    def poll(self) -> None:
        """Publish a finished asynchronous save (rank 0); raise a writer's bug."""
        pending = self.pending
        if pending is None:
            return
        if pending.error is not None:
            raise pending.error
        if _rank() == 0 and not pending.finished:
            markers = os.listdir(pending.folder / DONE)
            if any(name.endswith(".error") for name in markers):
                pending.finished = True  # wait() reports it on every rank
            elif len(markers) == _world():
                self._publish_pending(pending)

    def wait(self) -> None:
        """Finish the asynchronous save in flight (a collective); a refused write raises here,
        on every rank."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        pending.thread.join()
        if pending.error is not None:
            raise pending.error
        _barrier()
        refusals = []
        if _rank() == 0:
            done = pending.folder / DONE
            refusals = [
                (int(path.stem.removeprefix("rank")), path.read_text())
                for path in sorted(done.glob("rank*.error"))
            ]
            if not refusals and not pending.finished:
                _, why = _attempt(lambda: self._publish_pending(pending))
                refusals = [(0, why)] if why else []
        self._raise_if_refused(pending.iteration, pending.folder, _broadcast(refusals))

    def _publish_pending(self, pending: _Pending) -> None:
        digests = {}
        for marker in (pending.folder / DONE).glob("rank*"):
            digests.update(json.loads(marker.read_text()))
        self._publish(pending.iteration, pending.folder, pending.metadata, digests)
        pending.finished = True

    def _publish(self, iteration: int, tmp: Path, metadata: dict, digests: dict) -> None:
        """Rank 0: the config files and metadata (with every file's sha256), then the rename
        and `latest`."""
        shutil.rmtree(tmp / DONE, ignore_errors=True)
        digests.update(_write_configs(tmp, getattr(self.args, "config_files", None) or {}))
        atomic_write_json(
            tmp / METADATA_FILE, {**metadata, "sha256": dict(sorted(digests.items()))}
        )
        publish(self.save_dir, tmp, iteration)
        _prune(self.save_dir, getattr(self.args, "keep_last_n_checkpoints", None))

    def _raise_if_refused(self, iteration: int, tmp: Path, refusals: list) -> None:
        """Every rank raises the same error when a write was refused; rank 0 removes the
        partial folder first."""
        if not refusals:
            _barrier()
            return
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        latest = self.save_dir / "latest"
        previous = latest.read_text().strip() if latest.is_file() else "no checkpoint"
        rank, why = refusals[0]
        raise CheckpointError(
            f"save: could not write {tag_for(iteration)} in {self.save_dir} (rank {rank}: "
            f"{why}); the partial checkpoint was removed and `latest` still names {previous}"
        )


def _all_gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _broadcast(value):
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def _write_configs(folder: Path, config_files: dict[str, str]) -> dict[str, str]:
    """The run's config files under configs/; their sha256 by path in the folder."""
    (folder / "configs").mkdir(exist_ok=True)
    digests = {}
    for filename, text in config_files.items():
        name = f"configs/{Path(filename).name}"
        digests[name] = _write_bytes(folder / name, text.encode())
    return digests


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
    train_state: dict | None = None,
    optimizer: dict[str, torch.Tensor] | None = None,
    optimizer_step: int = 0,
    scheduler: dict | None = None,
    source: dict | None = None,
) -> Path:
    """A checkpoint holding only model weights (e.g. a converted Hugging Face model), in the
    same format; load it with `finetune: true` or `no_load_optim: true` (which also resumes
    the `train_state`: iteration and data position, e.g. of an imported NeoX run). With
    `optimizer` ("{name}.{key}" tensors, e.g. of an imported NeoX run's optimizer) it is a full
    resume but for the RNG states. `source` (where the weights came from) is recorded in the
    metadata under that key. One process only."""
    save_dir = Path(save_dir)
    tmp = save_dir / f".{tag_for(iteration)}.tmp"
    save_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, tmp / MODEL_FILE, metadata={"format": "strata"})
    files = {"model": [MODEL_FILE]}
    keys: list[str] = []
    if optimizer:
        optimizer = {name: t.detach().to("cpu").contiguous() for name, t in optimizer.items()}
        save_file(optimizer, tmp / OPTIMIZER_FILE, metadata={"format": "strata"})
        files["optimizer"] = [OPTIMIZER_FILE]
        keys = sorted({n.rsplit(".", 1)[1] for n in optimizer} - {MASTER})
    metadata = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "weights_only": not optimizer,
        "optimizer_step": optimizer_step if optimizer else 0,
        "optimizer_state_keys": keys,
        "scheduler": scheduler if optimizer else None,
        "rng": False,
        "train_state": dict(train_state or {}),
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        "padded_vocab_size": tensors[EMBEDDING].shape[0],
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        "layout": {
            "world_size": 1,
            "data_parallel_size": 1,
            "tensor_parallel_size": 1,
            "pipe_parallel_size": 1,
        },
        "files": files,
    }
    if source:
        metadata["source"] = source
    digests = _write_configs(tmp, config_files or {})
    for name in files.values():
        digests[name[0]] = file_sha256(tmp / name[0])
    atomic_write_json(tmp / METADATA_FILE, {**metadata, "sha256": dict(sorted(digests.items()))})
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
