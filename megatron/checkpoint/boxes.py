"""Where a rank's piece of a parameter sits in the full tensor.

A checkpoint stores each full (TP=1, unpartitioned) tensor as pieces written by the ranks that
hold them; a piece is a ``Box`` of the full tensor (offsets and lengths per dimension). What a
rank holds is a flat range of its tensor-parallel slice: the whole slice, a ZeRO fragment or a
ZeRO-3 partition. ``fragment_boxes`` maps such a range to the boxes of the full tensor it
covers, with where each box's values lie inside the range, so saving writes them and loading
reads exactly them, at any layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from megatron.mpu.layers import split_partition


@dataclass(frozen=True)
class Box:
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> Box:
        return cls((0,) * len(shape), tuple(shape))

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    def intersect(self, other: Box) -> Box | None:
        starts = tuple(map(max, self.offsets, other.offsets))
        ends = tuple(
            min(a + n, b + m)
            for a, n, b, m in zip(self.offsets, self.lengths, other.offsets, other.lengths)
        )
        if any(end <= start for start, end in zip(starts, ends)):
            return None
        return Box(starts, tuple(end - start for start, end in zip(starts, ends)))

    def within(self, outer: Box) -> tuple[slice, ...]:
        """Index of this box inside a tensor holding ``outer``."""
        return tuple(
            slice(a - o, a - o + n) for a, n, o in zip(self.offsets, self.lengths, outer.offsets)
        )


_PIECE_KEY = re.compile(r"(.+)\[(\d+:\d+(?:,\d+:\d+)*)\]")


def piece_key(name: str, box: Box, shape: tuple[int, ...]) -> str:
    """The safetensors key of a piece: the tensor's name when the box is the whole tensor (so a
    one-process checkpoint holds plain names), else ``name[start:end,...]``."""
    if box == Box.whole(shape):
        return name
    ranges = ",".join(f"{o}:{o + n}" for o, n in zip(box.offsets, box.lengths))
    return f"{name}[{ranges}]"


def parse_piece_key(key: str, shape_of_piece: tuple[int, ...]) -> tuple[str, Box]:
    """(tensor name, box) of a key ``piece_key`` wrote; a plain name is a whole tensor."""
    match = _PIECE_KEY.fullmatch(key)
    if match is None:
        return key, Box.whole(shape_of_piece)
    ranges = [tuple(map(int, part.split(":"))) for part in match.group(2).split(",")]
    return match.group(1), Box(tuple(a for a, _ in ranges), tuple(b - a for a, b in ranges))


@dataclass(frozen=True)
class TensorParallelSlice:
    """How a rank's tensor-parallel slice of a parameter maps into the full tensor: along
    ``dim`` its rows come from runs ``(local start, full start, length)``; other dimensions are
    whole. A parameter that is not split is one run covering everything."""

    full_shape: tuple[int, ...]
    dim: int
    runs: tuple[tuple[int, int, int], ...]

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = sum(length for _, _, length in self.runs)
        return tuple(shape)

    @classmethod
    def unsplit(cls, shape: tuple[int, ...]) -> TensorParallelSlice:
        return cls(tuple(shape), 0, ((0, 0, shape[0]),))

    @classmethod
    def of_rank(
        cls,
        full_shape: tuple[int, ...],
        dim: int,
        world: int,
        rank: int,
        stride: int = 1,
        order: torch.Tensor | None = None,
    ) -> TensorParallelSlice:
        """The slice ``split_partition(full, dim, world, rank, stride, order)`` takes."""
        rows = split_partition(torch.arange(full_shape[dim]), 0, world, rank, stride, order)
        # Consecutive full rows form one run.
        breaks = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist()
        starts = [0, *breaks]
        ends = [*breaks, len(rows)]
        runs = tuple((s, int(rows[s]), e - s) for s, e in zip(starts, ends))
        return cls(tuple(full_shape), dim, runs)


@dataclass(frozen=True)
class Placement:
    """A box of the full tensor and where its values lie in a flat fragment: the fragment's
    elements ``[start, start + block.numel)`` viewed as ``block`` lengths, narrowed along the
    split dimension to ``[narrow_start, narrow_start + box.lengths[dim])``."""

    box: Box
    start: int
    block: tuple[int, ...]
    dim: int
    narrow_start: int

    def view(self, fragment: torch.Tensor) -> torch.Tensor:
        """The box's values inside ``fragment`` (a view: writable)."""
        block = fragment.narrow(0, self.start, math.prod(self.block)).view(self.block)
        return block.narrow(self.dim, self.narrow_start, self.box.lengths[self.dim])


def flat_range_blocks(shape: tuple[int, ...], start: int, end: int) -> list[Box]:
    """The elements ``[start, end)`` of a row-major tensor of ``shape`` as boxes, each
    contiguous in memory and in order (at most two per dimension)."""
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    blocks = []
    while start < end:
        for d, stride in enumerate(strides):
            if start % stride == 0 and start + stride <= end:
                index = (start // stride) % shape[d]
                count = min((end - start) // stride, shape[d] - index)
                offsets = tuple((start // s) % n for s, n in zip(strides, shape))
                lengths = (1,) * d + (count,) + tuple(shape[d + 1 :])
                blocks.append(Box(offsets, lengths))
                start += count * stride
                break
    return blocks


def fragment_boxes(layout: TensorParallelSlice, start: int, end: int) -> list[Placement]:
    """The full-tensor boxes of elements ``[start, end)`` of the rank's flattened slice."""
    placements = []
    position = 0  # where the current block starts in the fragment
    for block in flat_range_blocks(layout.local_shape, start, end):
        low = block.offsets[layout.dim]
        high = low + block.lengths[layout.dim]
        for local_start, full_start, length in layout.runs:
            a, b = max(low, local_start), min(high, local_start + length)
            if a >= b:
                continue
            offsets = list(block.offsets)
            lengths = list(block.lengths)
            offsets[layout.dim] = full_start + a - local_start
            lengths[layout.dim] = b - a
            box = Box(tuple(offsets), tuple(lengths))
            placements.append(Placement(box, position, block.lengths, layout.dim, a - low))
        position += block.numel
    return placements
