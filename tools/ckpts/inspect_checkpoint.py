"""Show what a Strata checkpoint holds, or how two checkpoints differ.

    python tools/ckpts/inspect_checkpoint.py CKPT [--tensors] [--diff OTHER] [--verify]

CKPT (and OTHER) is a save folder (its `latest` names the checkpoint) or one `global_step{N}`
folder. Prints the layout that saved it (world, tensor/pipe/data-parallel sizes, ZeRO stage),
the iteration and the files' tensor counts; --tensors lists every tensor's name, shape, dtype
and L2 norm; --diff lists, per tensor present in both, the largest absolute difference, and the
names only one side has; --verify checks every file against the sha256 metadata.json records
(exit status 1 when one differs). Tensors are read one at a time, so any model size fits in
memory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from megatron.checkpoint import METADATA_FILE, CheckpointError, read_metadata, resolve_checkpoint
from megatron.checkpoint.format import TENSOR_KINDS, tensor_files
from megatron.checkpoint.integrity import checksum_problems
from megatron.checkpoint.reader import Checkpoint, TensorFiles
from megatron.cli import exit_status


def checkpoint_folder(path: str) -> Path:
    """The global_step folder `path` is, or the one its `latest` names."""
    folder = Path(path)
    if (folder / METADATA_FILE).is_file():
        return folder
    return resolve_checkpoint(path)


def tensor_kinds(checkpoint: Checkpoint) -> dict[str, TensorFiles]:
    """The model and (when saved) optimizer tensors, by the name of their file(s)."""
    kinds = {}
    for kind in TENSOR_KINDS:
        files = tensor_files(checkpoint.metadata, kind)
        if files and all((checkpoint.folder / name).is_file() for name in files):
            label = files[0] if len(files) == 1 else f"{kind} ({len(files)} files)"
            kinds[label] = checkpoint.model if kind == "model" else checkpoint.optimizer
    return kinds


def describe(checkpoint: Checkpoint, tensors: bool) -> list[str]:
    metadata = checkpoint.metadata
    layout = metadata.get("layout", {})
    lines = [
        f"checkpoint {checkpoint.folder}",
        f"  iteration {metadata['iteration']}"
        + (" (weights only)" if metadata.get("weights_only") else ""),
        "  layout " + ", ".join(f"{key} {value}" for key, value in layout.items()),
        f"  dtype {metadata.get('dtype')}, optimizer step {metadata.get('optimizer_step')}, "
        f"states {metadata.get('optimizer_state_keys')}",
        f"  train state {json.dumps(metadata.get('train_state', {}))}",
    ]
    for label, files in tensor_kinds(checkpoint).items():
        names = files.keys()
        count = sum(math.prod(files.shapes[name]) for name in names)
        lines.append(f"  {label}: {len(names)} tensors, {count:,} values")
        if tensors:
            for name in names:
                value = files.get(name)
                norm = value.float().norm().item()
                shape = "x".join(map(str, value.shape))
                dtype = str(value.dtype).removeprefix("torch.")
                lines.append(f"    {name:<60} {shape:<14} {dtype:<9} norm {norm:.6g}")
    return lines


def diff(checkpoint: Checkpoint, other: Checkpoint) -> tuple[list[str], bool]:
    """Lines describing the differences, and whether the checkpoints hold equal tensors."""
    lines = [f"diff {checkpoint.folder} -> {other.folder}"]
    same = True
    ours, theirs = tensor_kinds(checkpoint), tensor_kinds(other)
    for kind in TENSOR_KINDS:
        a = next((files for label, files in ours.items() if label.startswith(kind)), None)
        b = next((files for label, files in theirs.items() if label.startswith(kind)), None)
        if a is None and b is None:
            continue
        if a is None or b is None:
            lines.append(f"  {kind}: only in {checkpoint.folder if b is None else other.folder}")
            same = False
            continue
        a_names, b_names = set(a.keys()), set(b.keys())
        lines.append(f"  {kind}:")
        for name in sorted(a_names - b_names):
            lines.append(f"    missing in {other.folder.name}: {name}")
        for name in sorted(b_names - a_names):
            lines.append(f"    extra in {other.folder.name}: {name}")
        same &= a_names == b_names
        for name in sorted(a_names & b_names):
            x, y = a.get(name), b.get(name)
            if x.shape != y.shape:
                lines.append(f"    {name}: shape {list(x.shape)} vs {list(y.shape)}")
                same = False
                continue
            delta = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            same &= delta == 0.0
            lines.append(f"    {name:<60} max abs diff {delta:.6g}")
    return lines, same


def verify(folder: Path) -> None:
    """Print how many files match their recorded sha256; a CheckpointError when one does not."""
    metadata = read_metadata(folder)
    recorded = metadata.get("sha256")
    if not recorded:
        raise CheckpointError(f"{folder}: metadata.json records no sha256 (an older checkpoint)")
    problems = checksum_problems(folder, metadata)
    if problems:
        raise CheckpointError("\n".join(problems))
    print(f"verified: {len(recorded)} files match their sha256")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="save folder (holding `latest`) or a global_step folder")
    parser.add_argument("--tensors", action="store_true", help="list every tensor with its norm")
    parser.add_argument("--diff", metavar="OTHER", help="compare with another checkpoint")
    parser.add_argument("--verify", action="store_true", help="check every file's sha256")
    args = parser.parse_args(argv)

    def work() -> int | None:
        folder = checkpoint_folder(args.checkpoint)
        if args.verify:
            verify(folder)
        checkpoint = Checkpoint(folder)
        lines = describe(checkpoint, args.tensors)
        if args.diff:
            diff_lines, same = diff(checkpoint, Checkpoint(checkpoint_folder(args.diff)))
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
