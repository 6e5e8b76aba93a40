"""Write a safetensors file one tensor at a time.

The safetensors header lists every tensor's dtype, shape and byte range up front, so a writer
that knows the shapes in advance can emit the header first and then stream each tensor's bytes:
peak extra memory is one tensor, and the result is an ordinary safetensors file that
`safetensors.safe_open` / `load_file` read. Written under a temporary name and renamed on
`close()`, so an interrupted write never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class StreamingSafetensorsWriter:
    """`write()` each entry of `entries` ((name, dtype, shape), in that order), then `close()`;
    `sha256` is then the file's digest, computed as it was written."""

    def __init__(
        self,
        path: str | os.PathLike,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.expected = list(entries)
        self.position = 0
        header: dict[str, object] = {"__metadata__": dict(metadata or {})}
        offset = 0
        for name, dtype, shape in self.expected:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.digest = hashlib.sha256()
        self.handle = open(self.tmp, "wb")
        self._emit(struct.pack("<Q", len(encoded)))
        self._emit(encoded)

    def _emit(self, data) -> None:
        self.handle.write(data)
        self.digest.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.position >= len(self.expected):
            raise ValueError(f"{self.path}: unexpected tensor {name!r} after the last entry")
        want_name, dtype, shape = self.expected[self.position]
        if (name, dtype, tuple(shape)) != (want_name, tensor.dtype, tuple(tensor.shape)):
            raise ValueError(
                f"{self.path}: entry {self.position} should be {want_name} {dtype} "
                f"{list(shape)}, got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._emit(memoryview(data.numpy()))
        self.position += 1

    def close(self) -> None:
        missing = [name for name, _, _ in self.expected[self.position :]]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: {len(missing)} tensors never written ({missing[0]}...)")
        self.handle.flush()
        os.fsync(self.handle.fileno())  # on disk before anything can point at it
        self.handle.close()
        os.replace(self.tmp, self.path)
        self.sha256 = self.digest.hexdigest()

    def abort(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)
