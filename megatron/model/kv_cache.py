"""Keys and values of earlier positions, so incremental decoding computes only the new tokens."""

from __future__ import annotations

import torch


class KVCache:
    """One slot per layer number holding [b, kv_heads, length, head_dim] keys and values (a
    pipeline stage fills only its own layers' slots).

    Buffers are allocated on first use with room for `max_length` positions (grown by doubling
    if exceeded). Attention calls `update(layer, k, v)` with the new positions' keys and values
    (rotary already applied) and attends to what it returns; the model calls `advance(n)` once
    after all layers have seen the n new positions.
    """

    def __init__(self, max_length: int = 0) -> None:
        self.length = 0
        self.max_length = max_length
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def _room(self, buffer: torch.Tensor | None, like: torch.Tensor, needed: int) -> torch.Tensor:
        if buffer is not None and buffer.shape[2] >= needed:
            return buffer
        capacity = max(needed, self.max_length, 2 * (buffer.shape[2] if buffer is not None else 0))
        grown = like.new_empty(like.shape[0], like.shape[1], capacity, like.shape[3])
        if buffer is not None:
            grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v; return all positions' keys and values so far."""
        end = self.length + k.shape[2]
        keys = self._keys[layer] = self._room(self._keys.get(layer), k, end)
        values = self._values[layer] = self._room(self._values.get(layer), v, end)
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def positions(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """[1, n] default positions of the next n tokens: length .. length + n - 1."""
        return torch.arange(self.length, self.length + n, device=device)[None, :]
