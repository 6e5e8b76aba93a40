"""The Hugging Face side of a conversion: reading and writing model directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megatron.conversion.hf_config import ConversionError
from megatron.conversion.maps import Architecture, architecture_for_hf_class

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Tokenizer files of a Hugging Face model folder that travel with its tokenizer.json.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def read_hf_config(hf_dir: Path) -> tuple[Any, Architecture]:
    """The transformers config of `hf_dir` and the map of its architecture."""
    path = hf_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found (expected a Hugging Face model folder)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: cannot read: {err}") from None
    classes = raw.get("architectures") or []
    if len(classes) != 1:
        raise ConversionError(f"{path}: expected one entry in 'architectures', got {classes!r}")
    arch = architecture_for_hf_class(classes[0], str(path))
    import transformers

    try:
        config = getattr(transformers, arch.config_class).from_pretrained(hf_dir)
    except (OSError, ValueError, TypeError) as err:
        raise ConversionError(f"{path}: not a valid {arch.config_class}: {err}") from None
    return config, arch


def _shards(hf_dir: Path, index_name: str) -> list[Path]:
    index = hf_dir / index_name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConversionError(f"{index}: not a valid shard index: {err}") from None
    shards = [hf_dir / name for name in sorted(set(weight_map.values()))]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise ConversionError(f"{index}: names shards that do not exist: {', '.join(missing)}")
    return shards


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors or PyTorch `.bin` checkpoint, single or sharded."""
    if (hf_dir / SAFETENSORS_INDEX).is_file():
        files = _shards(hf_dir, SAFETENSORS_INDEX)
    elif (hf_dir / SAFETENSORS).is_file():
        files = [hf_dir / SAFETENSORS]
    elif (hf_dir / BIN_INDEX).is_file():
        files = _shards(hf_dir, BIN_INDEX)
    elif (hf_dir / BIN).is_file():
        files = [hf_dir / BIN]
    else:
        raise ConversionError(
            f"{hf_dir}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} "
            f"or {BIN_INDEX})"
        )
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                tensors.update(load_file(path))
            else:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # safetensors and torch raise their own error types
            raise ConversionError(f"{path}: cannot read: {err}") from None
    return tensors


def write_hf_weights(
    folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int
) -> list[str]:
    """model.safetensors, or shards plus their index when larger than `max_shard_bytes`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / SAFETENSORS, metadata={"format": "pt"})
        return [SAFETENSORS]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_hf_config(
    folder: Path, arch: Architecture, kwargs: dict[str, Any], dtype: torch.dtype
) -> None:
    import transformers

    config = getattr(transformers, arch.config_class)(**kwargs)
    config.architectures = [arch.hf_class]
    config.dtype = dtype
    config.save_pretrained(folder)


def write_tokenizer(folder: Path, args: Any, eod: int) -> tuple[str, dict[str, int]]:
    """Hugging Face tokenizer files for the config's tokenizer; returns a note for the user and
    the special token ids for config.json / generation_config.json."""
    kind = str(args.tokenizer_type).lower()
    if kind == "hftokenizer":
        source = Path(args.vocab_file)
        shutil.copyfile(source, folder / "tokenizer.json")
        for name in TOKENIZER_SIDE_FILES:
            if (source.parent / name).is_file():
                shutil.copyfile(source.parent / name, folder / name)
        if not (folder / "tokenizer_config.json").is_file():
            _write_fast_tokenizer_config(folder, eod)
    elif kind in ("gpt2bpetokenizer", "hfgpt2tokenizer"):
        from transformers import GPT2TokenizerFast

        if Path(args.vocab_file).is_dir():
            tok = GPT2TokenizerFast.from_pretrained(args.vocab_file, local_files_only=True)
        else:
            from megatron.tokenizer.gpt2 import byte_level_bpe

            tok = GPT2TokenizerFast(
                tokenizer_object=byte_level_bpe(args.vocab_file, args.merge_file)
            )
            if kind == "hfgpt2tokenizer":
                tok.add_special_tokens({"pad_token": "<|padding|>"})  # as NeoX's HFGPT2Tokenizer
        tok.save_pretrained(folder)
    else:
        return (
            f"tokenizer_type {args.tokenizer_type} has no Hugging Face tokenizer format: no "
            "tokenizer files were written; add the matching tokenizer to the folder yourself",
            {"bos_token_id": eod, "eos_token_id": eod},
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    ids = {key: eod if value is None else value for key, value in ids.items()}
    if tok.pad_token_id is not None:
        ids["pad_token_id"] = tok.pad_token_id
    return f"tokenizer files written from {args.vocab_file}", ids


def _write_fast_tokenizer_config(folder: Path, eod: int) -> None:
    from tokenizers import Tokenizer

    eod_token = Tokenizer.from_file(str(folder / "tokenizer.json")).id_to_token(eod)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eod_token,
        "eos_token": eod_token,
        "unk_token": None,
        "model_max_length": int(1e30),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
