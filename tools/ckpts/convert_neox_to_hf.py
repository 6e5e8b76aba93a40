"""Export a Strata checkpoint as a Hugging Face `transformers` model folder.

    python tools/ckpts/convert_neox_to_hf.py --input CKPT_DIR --config FILE [FILE ...] \
        --output HF_DIR [--dtype bf16|fp16|fp32] [--architecture auto|gpt_neox|llama|mistral] \
        [--iteration N]

Reads the checkpoint `CKPT_DIR/latest` names, or `CKPT_DIR/global_step{N}` with --iteration or
the config's `iteration` key (full tensors: any training layout) and the model
the NeoX config describes, and writes config.json, safetensors weights (vocabulary unpadded to
the tokenizer's size, or --vocab-size), generation_config.json and the tokenizer files: an
HFTokenizer's tokenizer.json (with the tokenizer_config.json, special_tokens_map.json and chat
template beside it), GPT-2 BPE files as a GPT2TokenizerFast; other tokenizer types have no
Hugging Face format and are left out (the tool says so). Nothing is written unless all succeeds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from megatron.cli import exit_status
from megatron.conversion import ARCHITECTURES, ConversionError, auto_architecture
from megatron.conversion.hf_io import (
    DTYPES,
    write_hf_config,
    write_hf_weights,
    write_tokenizer,
)
from megatron.conversion.strata_io import (
    configured_iteration,
    dims_for,
    expected_shapes,
    read_checkpoint,
    read_model,
)
from megatron.utils import staged_folder

DEFAULT_SHARD_GB = 5.0


def convert_neox_to_hf(
    ckpt_dir: str | os.PathLike[str],
    config_files: list[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    dtype: str | None = None,
    architecture: str = "auto",
    vocab_size: int | None = None,
    max_shard_gb: float = DEFAULT_SHARD_GB,
    iteration: int | None = None,
) -> tuple[Path, str]:
    """Write the Hugging Face folder `output`; returns it and a note about the tokenizer.
    Reads the checkpoint `latest` names, or `global_step{iteration}` (`iteration`, else the
    config's `iteration` key, as NeoX)."""
    output = Path(output)
    if output.exists():
        raise ConversionError(f"output already exists: {output}")
    config, keys, tokenizer = read_model(config_files)
    arch = auto_architecture(config) if architecture == "auto" else ARCHITECTURES[architecture]
    vocab = vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConversionError(
            f"--vocab-size {vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens"
        )
    hf_config = arch.to_hf(config, vocab)
    if iteration is None:
        iteration = configured_iteration(config_files)
    tensors, folder = read_checkpoint(ckpt_dir, iteration)
    hf_tensors = arch.to_hf_tensors(
        tensors, expected_shapes(config), dims_for(config, vocab), source=str(folder)
    )
    torch_dtype = DTYPES[dtype] if dtype else next(iter(tensors.values())).dtype
    hf_tensors = {name: t.to(torch_dtype) for name, t in hf_tensors.items()}

    with staged_folder(output) as staging:
        write_hf_weights(staging, hf_tensors, int(max_shard_gb * 2**30))
        note, special_ids = write_tokenizer(staging, keys, tokenizer.eod)
        write_hf_config(staging, arch, {**hf_config, **special_ids}, torch_dtype)
        _write_generation_config(staging, keys, special_ids)
    return output, note


def _write_generation_config(folder: Path, keys, special_ids: dict[str, int]) -> None:
    """The source model's generation_config.json when the tokenizer came from a Hugging Face
    folder that has one (it may name chat stop tokens), else one from the special tokens."""
    if str(keys.tokenizer_type).lower() == "hftokenizer":
        source = Path(keys.vocab_file).parent / "generation_config.json"
        if source.is_file():
            shutil.copyfile(source, folder / "generation_config.json")
            return
    from transformers import GenerationConfig

    GenerationConfig(**special_ids).save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="checkpoint folder (holding `latest`)")
    parser.add_argument(
        "--config", required=True, nargs="+", help="NeoX config file(s) of the model"
    )
    parser.add_argument("--output", required=True, help="Hugging Face folder to create")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--architecture",
        choices=["auto", *sorted(ARCHITECTURES)],
        default="auto",
        help="auto: llama for rmsnorm + swiglu (mistral with a sliding window), else gpt_neox",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="vocabulary rows to export (default: the tokenizer's size; more keeps padding rows)",
    )
    parser.add_argument(
        "--max-shard-gb", type=float, default=DEFAULT_SHARD_GB, help="largest weights file"
    )
    parser.add_argument(
        "--iteration",
        type=int,
        help="export global_step{N} instead of the checkpoint `latest` names (default: the "
        "config's iteration key, if set)",
    )
    args = parser.parse_args(argv)

    def work() -> int | None:
        out, note = convert_neox_to_hf(
            args.input,
            args.config,
            args.output,
            args.dtype,
            args.architecture,
            args.vocab_size,
            args.max_shard_gb,
            args.iteration,
        )
        print(note)
        print(f"wrote {out}")
        return 0

    return exit_status(work, (ConversionError,))


if __name__ == "__main__":
    sys.exit(main())
