"""Show what a Strata checkpoint holds, or how two checkpoints differ.

    python tools/ckpts/inspect_checkpoint.py CKPT [--tensors] [--diff OTHER]

CKPT (and OTHER) is a save folder (its `latest` names the checkpoint) or one `global_step{N}`
folder. Prints the layout that saved it (world, tensor/pipe/data-parallel sizes, ZeRO stage),
the iteration and the files' tensor counts; --tensors lists every tensor's name, shape, dtype
and L2 norm; --diff lists, per tensor present in both, the largest absolute difference, and the
names only one side has. Tensors are read one at a time, so any model size fits in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from megatron.checkpoint import (
    METADATA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    read_metadata,
    resolve_checkpoint,
)
from megatron.cli import exit_status

TENSOR_FILES = (MODEL_FILE, OPTIMIZER_FILE)


def checkpoint_folder(path: str) -> Path:
    """The global_step folder `path` is, or the one its `latest` names."""
    folder = Path(path)
    if (folder / METADATA_FILE).is_file():
        return folder
    return resolve_checkpoint(path)


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _files(folder: Path) -> list[Path]:
    return [folder / name for name in TENSOR_FILES if (folder / name).is_file()]


def describe(folder: Path, tensors: bool) -> list[str]:
    metadata = read_metadata(folder)
    layout = metadata.get("layout", {})
    lines = [
        f"checkpoint {folder}",
        f"  iteration {metadata['iteration']}"
        + (" (weights only)" if metadata.get("weights_only") else ""),
        "  layout " + ", ".join(f"{key} {value}" for key, value in layout.items()),
        f"  dtype {metadata.get('dtype')}, optimizer step {metadata.get('optimizer_step')}, "
        f"states {metadata.get('optimizer_state_keys')}",
        f"  train state {json.dumps(metadata.get('train_state', {}))}",
    ]
    for path in _files(folder):
        handle = _open(path)
        names = list(handle.keys())
        count = sum(_numel(handle, name) for name in names)
        lines.append(f"  {path.name}: {len(names)} tensors, {count:,} values")
        if tensors:
            for name in names:
                value = handle.get_tensor(name)
                norm = value.float().norm().item()
                shape = "x".join(map(str, value.shape))
                dtype = str(value.dtype).removeprefix("torch.")
                lines.append(f"    {name:<60} {shape:<14} {dtype:<9} norm {norm:.6g}")
    return lines


def _numel(handle, name: str) -> int:
    count = 1
    for size in handle.get_slice(name).get_shape():
        count *= size
    return count


def diff(folder: Path, other: Path) -> tuple[list[str], bool]:
    """Lines describing the differences, and whether the checkpoints hold equal tensors."""
    lines = [f"diff {folder} -> {other}"]
    same = True
    for filename in TENSOR_FILES:
        a_path, b_path = folder / filename, other / filename
        if not a_path.is_file() and not b_path.is_file():
            continue
        if not (a_path.is_file() and b_path.is_file()):
            lines.append(f"  {filename}: only in {folder if a_path.is_file() else other}")
            same = False
            continue
        a, b = _open(a_path), _open(b_path)
        a_names, b_names = set(a.keys()), set(b.keys())
        lines.append(f"  {filename}:")
        for name in sorted(a_names - b_names):
            lines.append(f"    missing in {other.name}: {name}")
        for name in sorted(b_names - a_names):
            lines.append(f"    extra in {other.name}: {name}")
        same &= a_names == b_names
        for name in sorted(a_names & b_names):
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.shape != y.shape:
                lines.append(f"    {name}: shape {list(x.shape)} vs {list(y.shape)}")
                same = False
                continue
            delta = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            same &= delta == 0.0
            lines.append(f"    {name:<60} max abs diff {delta:.6g}")
    return lines, same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="save folder (holding `latest`) or a global_step folder")
    parser.add_argument("--tensors", action="store_true", help="list every tensor with its norm")
    parser.add_argument("--diff", metavar="OTHER", help="compare with another checkpoint")
    args = parser.parse_args(argv)

    def work() -> int | None:
        folder = checkpoint_folder(args.checkpoint)
        lines = describe(folder, args.tensors)
        if args.diff:
            diff_lines, same = diff(folder, checkpoint_folder(args.diff))
            lines += diff_lines
            lines.append("tensors are identical" if same else "tensors differ")
        print("\n".join(lines))
        return 0

    return exit_status(
        work, (CheckpointError,), describe=lambda err: str(err).removeprefix("load: ")
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
