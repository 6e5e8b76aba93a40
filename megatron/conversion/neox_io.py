"""Reading and writing GPT-NeoX's native checkpoint folders (`global_step{N}/` of DeepSpeed
model-state files, and `latest`); the names and shards are megatron/conversion/neox_layout.py's.

Files are plain pickles of dicts, tensors and numbers, so `torch.load(weights_only=True)` reads
them (GPT-NeoX's converter loads them with torch's default, which is that since torch 2.6).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from megatron.conversion.hf_config import ConversionError
from megatron.conversion.neox_layout import (
    LEGACY_MLP,
    layer_file,
    normalize_names,
    sequential_file,
)

LAYOUTS = ("sequential", "pipeline")
_SEQUENTIAL_KEY = re.compile(r"sequential\.(\d+)\.(.+)")
_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
# What GPT-NeoX checkpoints pickle beside tensors: NumPy's RNG state.
_NUMPY_GLOBALS = [np.dtype, np.ndarray, np._core.multiarray._reconstruct, np.dtypes.UInt32DType]


class NeoXCheckpoint(NamedTuple):
    folder: Path
    layout: str
    tensor_parallel: int
    layers: dict[int, list[dict[str, torch.Tensor]]]  # layer -> per rank, normalized names
    client_state: dict[str, Any]  # mp_rank_00's entries other than the module
    legacy_names: bool  # older GPT-NeoX MLP names (and its grouped-query row layout)


def resolve_folder(neox_dir: str | Path, iteration: int | None = None) -> Path:
    """The `global_step{N}` folder of a NeoX save directory (`latest` names it, or
    `iteration`), or `neox_dir` itself when it is such a folder."""
    neox_dir = Path(neox_dir)
    if not neox_dir.is_dir():
        raise ConversionError(f"--input {neox_dir}: not a directory")
    if iteration is not None:
        folder, named_by = neox_dir / f"global_step{iteration}", f"--iteration {iteration}"
    elif (neox_dir / "latest").is_file():
        tag = (neox_dir / "latest").read_text().strip()
        folder, named_by = neox_dir / tag, f"{neox_dir / 'latest'} ({tag!r})"
    elif _model_files(neox_dir):
        return neox_dir
    else:
        raise ConversionError(
            f"--input {neox_dir}: neither a NeoX save directory (no 'latest' file naming a "
            "global_step{N} folder) nor a checkpoint folder (no mp_rank_00_model_states.pt or "
            "layer_00-model_00-model_states.pt)"
        )
    if not folder.is_dir():
        found = sorted(p.name for p in neox_dir.glob("global_step*") if p.is_dir())
        raise ConversionError(
            f"{folder}: not found (named by {named_by}; folders there: "
            f"{', '.join(found) or 'none'})"
        )
    return folder


def _model_files(folder: Path) -> list[Path]:
    return [
        p for p in folder.iterdir() if _LAYER_FILE.fullmatch(p.name) or _MP_FILE.fullmatch(p.name)
    ]


def _load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except Exception as err:  # unpickling errors of several types
        raise ConversionError(
            f"{path}: cannot read as a DeepSpeed model-state file: {err}"
        ) from None


def read_checkpoint(folder: Path) -> NeoXCheckpoint:
    """Every layer of every tensor-parallel rank of a NeoX `global_step{N}` folder."""
    layer_files = {}
    for path in folder.iterdir():
        if found := _LAYER_FILE.fullmatch(path.name):
            layer_files[int(found.group(1)), int(found.group(2))] = path
    mp_files = {
        int(found.group(1)): path
        for path in folder.iterdir()
        if (found := _MP_FILE.fullmatch(path.name))
    }
    if not layer_files and not mp_files:
        raise ConversionError(
            f"{folder}: no GPT-NeoX model files (expected mp_rank_00_model_states.pt, or "
            "layer_00-model_00-model_states.pt with a pipeline)"
        )
    layers: dict[int, list[dict[str, torch.Tensor]]] = {}
    if layer_files:
        layout = "pipeline"
        tp = 1 + max(rank for _, rank in layer_files)
        for layer in sorted({layer for layer, _ in layer_files}):
            for rank in range(tp):
                if (layer, rank) not in layer_files:
                    raise ConversionError(f"{folder / layer_file(layer, rank)}: missing")
            layers[layer] = [_state_dict(layer_files[layer, r]) for r in range(tp)]
        client = _load(mp_files[0]) if 0 in mp_files else {}
    else:
        layout = "sequential"
        tp = 1 + max(mp_files)
        states = []
        for rank in range(tp):
            if rank not in mp_files:
                raise ConversionError(f"{folder / sequential_file(rank)}: missing")
            states.append(_load(mp_files[rank]))
        for rank, state in enumerate(states):
            _sequential_layers(mp_files[rank], state, rank, tp, layers)
        client = states[0]
    client = {k: v for k, v in dict(client).items() if k != "module"}
    legacy = any(LEGACY_MLP.fullmatch(k) for ranks in layers.values() for k in ranks[0])
    layers = {layer: [normalize_names(s) for s in ranks] for layer, ranks in layers.items()}
    return NeoXCheckpoint(folder, layout, tp, dict(sorted(layers.items())), client, legacy)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = _load(path)
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a layer's state dict, got {type(state).__name__}")
    return state


def _sequential_layers(path: Path, state: Any, rank: int, tp: int, layers: dict) -> None:
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise ConversionError(
            f"{path}: holds no 'module' state dict (a pipeline checkpoint whose "
            "layer_XX-model_YY-model_states.pt files are missing?)"
        )
    for key, tensor in module.items():
        found = _SEQUENTIAL_KEY.fullmatch(key)
        if found is None:
            raise ConversionError(
                f"{path}: module key {key!r} is not a GPT-NeoX name (expected sequential.N.name)"
            )
        ranks = layers.setdefault(int(found.group(1)), [{} for _ in range(tp)])
        ranks[rank][found.group(2)] = tensor


def client_state(
    iteration: int,
    tp: int,
    consumed_samples: int | None,
    scheduler: dict | None,
    args: dict[str, Any],
) -> dict[str, Any]:
    """What DeepSpeed's engine and GPT-NeoX's loader read from mp_rank_XX_model_states.pt
    besides the module (GPT-NeoX's `iteration` and `args`, DeepSpeed's step counters)."""
    try:
        ds_version = version("deepspeed")
    except PackageNotFoundError:
        ds_version = "0.0.0"
    state = {
        "buffer_names": [],
        "optimizer": None,
        "lr_scheduler": scheduler,
        "sparse_tensor_module_names": [],
        "skipped_steps": 0,
        "global_steps": iteration,
        "dp_world_size": 1,
        "mp_world_size": tp,
        "ds_version": ds_version,
        "iteration": iteration,
        "args": args,
    }
    if consumed_samples is not None:
        state["global_samples"] = consumed_samples
    return state


def write_checkpoint(
    folder: Path,
    layers: dict[int, list[dict[str, torch.Tensor]]],
    tp: int,
    layout: str,
    client: dict[str, Any],
) -> list[str]:
    """The files of one `global_step{N}` folder; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for rank in range(tp):
        if layout == "sequential":
            module = {
                f"sequential.{layer}.{key}": tensor
                for layer, ranks in layers.items()
                for key, tensor in ranks[rank].items()
            }
        else:
            module = None
            for layer, ranks in layers.items():
                torch.save(ranks[rank], folder / layer_file(layer, rank))
                names.append(layer_file(layer, rank))
        torch.save({"module": module, **client}, folder / sequential_file(rank))
        names.append(sequential_file(rank))
    return sorted(names)


# ------------------------------------------------------------------------- optimizer state

UNIVERSAL_STATES = ("fp32", "exp_avg", "exp_avg_sq")
_PARAM_NAME = re.compile(r"(?:module\.)?(?:sequential\.)?(\d+)\.(.+)")
_TIED_NAME = re.compile(r"(?:module\.)?tied_modules\.[^.]+\.(.+)")


def read_optimizer_states(
    folder: Path, tp: int, work_dir: Path
) -> tuple[dict[str, dict[int, list[dict[str, torch.Tensor]]]], int]:
    """The ZeRO optimizer state of a NeoX checkpoint folder, made per-parameter by DeepSpeed's
    universal-checkpoint conversion (`deepspeed.checkpoint.ds_to_universal`, run in
    `work_dir`): per state (fp32, exp_avg, exp_avg_sq), layer -> per rank state dicts (names
    normalized), and the optimizer's step."""
    if not list(folder.glob("*_optim_states.pt")):
        raise ConversionError(
            f"{folder}: no ZeRO optimizer files (zero_pp_rank_*_mp_rank_*_optim_states.pt): "
            "import it without --with-optimizer"
        )
    universal = work_dir / "universal"
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(folder),
        "--output_folder",
        str(universal),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise ConversionError(
            f"{folder}: DeepSpeed's ds_to_universal could not convert the optimizer state:\n  "
            + "\n  ".join(tail)
        )
    states: dict[str, dict[int, list[dict[str, torch.Tensor]]]] = {s: {} for s in UNIVERSAL_STATES}
    step = 0
    for param_dir in sorted(p for p in (universal / "zero").iterdir() if p.is_dir()):
        name = param_dir.name
        if found := _TIED_NAME.fullmatch(name):
            layer, local = 0, found.group(1)
        elif found := _PARAM_NAME.fullmatch(name):
            layer, local = int(found.group(1)), found.group(2)
        else:
            raise ConversionError(f"{folder}: optimizer state of {name!r}, not a GPT-NeoX name")
        for state in UNIVERSAL_STATES:
            merged = _load(param_dir / f"{state}.pt")["param"]
            if merged.shape[0] % tp:
                raise ConversionError(
                    f"{param_dir / state}.pt: {list(merged.shape)} does not hold {tp} equal "
                    "tensor-parallel slices"
                )
            # Without GPT-NeoX's parallelism patterns the ranks' slices are concatenated by rows.
            for rank, piece in enumerate(merged.chunk(tp, dim=0)):
                ranks = states[state].setdefault(layer, [{} for _ in range(tp)])
                ranks[rank][local] = piece
        if (param_dir / "step.pt").is_file():
            step = int(_load(param_dir / "step.pt"))
    normalized = {
        state: {layer: [normalize_names(s) for s in ranks] for layer, ranks in layers.items()}
        for state, layers in states.items()
    }
    return normalized, step
