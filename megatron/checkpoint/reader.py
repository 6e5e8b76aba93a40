"""Reading checkpoints: full tensors, or only the boxes a process needs, from the pieces the
writers left (megatron/checkpoint/format.py). Files are memory-mapped, so a read touches only
the bytes of the pieces it overlaps. The public entry points for tools are
``open_checkpoint`` and ``read_model_tensors``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from megatron.checkpoint.boxes import Box, parse_piece_key
from megatron.checkpoint.format import (
    CheckpointError,
    read_metadata,
    resolve_checkpoint,
    tensor_files,
)
from megatron.safetensors_stream import DTYPE_CODES


class TensorFiles:
    """The tensors of one kind ("model" or "optimizer") over the files holding their pieces."""

    def __init__(self, folder: Path, files: list[str]) -> None:
        self.paths = [folder / name for name in files]
        self.handles = {path: _open(path) for path in self.paths}
        # name -> (file, key, box) of each of its pieces
        self.pieces: dict[str, list[tuple[Path, str, Box]]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path, handle in self.handles.items():
            for key in handle.keys():
                piece = handle.get_slice(key)
                name, box = parse_piece_key(key, tuple(piece.get_shape()))
                self.pieces.setdefault(name, []).append((path, key, box))
                self.dtypes[name] = _DTYPES[piece.get_dtype()]
        self.shapes = {name: _extent(pieces) for name, pieces in self.pieces.items()}
        for name, pieces in self.pieces.items():
            held = sum(box.numel for _, _, box in pieces)
            full = Box.whole(self.shapes[name]).numel
            if held != full:
                raise CheckpointError(
                    f"load: {self.paths[0].parent}: {name} is incomplete: its pieces hold "
                    f"{held} of its {full} values (a tensor file is missing or foreign)"
                )

    def keys(self) -> list[str]:
        return list(self.pieces)

    def __contains__(self, name: str) -> bool:
        return name in self.pieces

    def get(self, name: str) -> torch.Tensor:
        """The full tensor."""
        pieces = self.pieces[name]
        if len(pieces) == 1:
            path, key, _ = pieces[0]
            return self.handles[path].get_tensor(key)
        return self.read(name, Box.whole(self.shapes[name]))

    def read(self, name: str, box: Box, out: torch.Tensor | None = None) -> torch.Tensor:
        """The values of `box` of tensor `name` (into `out` when given)."""
        if out is None:
            out = torch.empty(box.lengths, dtype=self.dtypes[name])
        for path, key, piece in self.pieces[name]:
            part = piece.intersect(box)
            if part is not None:
                out[part.within(box)] = self.handles[path].get_slice(key)[part.within(piece)]
        return out


class Checkpoint:
    """A checkpoint folder: its metadata, model tensors and (opened when asked) optimizer
    tensors."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.metadata = read_metadata(self.folder)
        self.model = TensorFiles(self.folder, self._files("model"))
        self._optimizer: TensorFiles | None = None

    def _files(self, kind: str) -> list[str]:
        files = tensor_files(self.metadata, kind)
        for name in files:
            if not (self.folder / name).is_file():
                raise CheckpointError(f"load: {self.folder / name} is missing")
        return files

    @property
    def optimizer(self) -> TensorFiles:
        if self._optimizer is None:
            self._optimizer = TensorFiles(self.folder, self._files("optimizer"))
        return self._optimizer


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint folder (``global_step{N}``), or a save directory whose `latest` names one."""
    path = Path(path)
    if (path / "latest").is_file():
        path = resolve_checkpoint(os.fspath(path))
    return Checkpoint(path)


def read_model_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint, full, under its canonical name."""
    model = open_checkpoint(path).model
    return {name: model.get(name) for name in model.keys()}


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"load: {path} is missing")
    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"load: cannot read {path}: {err}") from err


def _extent(pieces: list[tuple[Path, str, Box]]) -> tuple[int, ...]:
    """The full tensor's shape: its pieces tile it."""
    ends = [tuple(o + n for o, n in zip(box.offsets, box.lengths)) for _, _, box in pieces]
    return tuple(max(column) for column in zip(*ends))


_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
