"""Convert a Hugging Face model folder into a Strata checkpoint plus a NeoX-format config.

    python tools/ckpts/convert_hf_to_neox.py (--input HF_DIR | --hf-model ORG/NAME [--revision R])
        --output CKPT_DIR [--config-out FILE] [--tokenizer tokenizer.json]
        [--make-vocab-size-divisible-by N]

Reads GPTNeoXForCausalLM, LlamaForCausalLM and MistralForCausalLM weights (safetensors or
PyTorch .bin, single or sharded), from a folder or from the Hub through huggingface_hub's cache
(HF_HUB_OFFLINE=1 uses a cached revision without the network; the repo, revision and commit
are recorded in the checkpoint's metadata under "source"). CKPT_DIR gets a weights-only checkpoint (global_step0/ and
`latest`) and config.yml, the model and tokenizer keys; train from it with that config plus
your setup config and `load=CKPT_DIR finetune=true`. Nothing is written unless all succeeds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from megatron.checkpoint.save import save_weights_checkpoint
from megatron.cli import exit_status
from megatron.conversion import ConversionError
from megatron.conversion.hf_io import read_hf_config, read_hf_tensors
from megatron.conversion.strata_io import dims_for, expected_shapes, model_config
from megatron.hub.client import HubError
from megatron.hub.download import Snapshot
from megatron.tokenizer import pad_vocab_size
from megatron.utils import atomic_write_text, staged_folder

CONFIG_NAME = "config.yml"
PREFERRED_DIVISORS = (128, 64, 32, 16, 8, 4, 2, 1)


def tokenizer_vocab_size(path: Path) -> int:
    from megatron.tokenizer import build_tokenizer

    try:
        return build_tokenizer("HFTokenizer", path).vocab_size
    except (OSError, ValueError) as err:
        raise ConversionError(f"tokenizer {path}: {err}") from None


def vocab_divisor(tokenizer_vocab: int, model_vocab: int, requested: int | None) -> int:
    """make_vocab_size_divisible_by giving exactly the model's rows (the largest power of two
    up to NeoX's 128 that does, else the smallest divisor that does); or the requested value,
    which may pad further (extra rows are zeros)."""
    if requested is not None:
        padded = pad_vocab_size(tokenizer_vocab, requested, 1)
        if padded < model_vocab:
            raise ConversionError(
                f"--make-vocab-size-divisible-by {requested} pads the tokenizer's "
                f"{tokenizer_vocab} tokens to {padded} rows, fewer than the model's {model_vocab}"
            )
        return requested
    for divisor in PREFERRED_DIVISORS:
        if pad_vocab_size(tokenizer_vocab, divisor, 1) == model_vocab:
            return divisor
    return next(
        d for d in range(model_vocab - tokenizer_vocab + 1, model_vocab + 1) if model_vocab % d == 0
    )


def render_config(
    values: dict[str, Any],
    origin: str,
    hf_class: str,
    output: Path,
    rows: int | None = None,
) -> str:
    header = (
        f"# {hf_class} from {origin}, converted by tools/ckpts/convert_hf_to_neox.py.\n"
        "# Model and tokenizer keys only: combine with a setup config (data, optimizer, batch,\n"
        f"# precision) and start from the weights with load: {output.resolve()} and finetune: true.\n"
    )
    if "tokenizer_type" not in values:
        header += (
            "# The input had no tokenizer.json: set tokenizer_type and vocab_file (a tokenizer of\n"
            f"# at most {rows} tokens) before training.\n"
        )
    return header + yaml.safe_dump(values, sort_keys=False)


def convert_hf_to_neox(
    hf_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config_out: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    make_vocab_size_divisible_by: int | None = None,
    log: Callable[[str], object] = print,
    snapshot: Snapshot | None = None,
) -> Path:
    """Write the checkpoint folder `output` (built beside it, renamed when complete). Without
    a tokenizer.json in `hf_dir` (and no `tokenizer`), the config has no tokenizer keys and
    `log` gets a line saying so. `snapshot`: `hf_dir` is that Hub download (recorded)."""
    hf_dir, output = Path(hf_dir), Path(output)
    for path in (output, config_out):
        if path is not None and Path(path).exists():
            raise ConversionError(f"output already exists: {path}")
    if not hf_dir.is_dir():
        raise ConversionError(f"--input {hf_dir}: not a directory")
    hf_config, arch = read_hf_config(hf_dir)
    values = arch.to_neox(hf_config, str(hf_dir / "config.json"))
    rows = hf_config.vocab_size
    tokenizer_file = Path(tokenizer) if tokenizer else hf_dir / "tokenizer.json"
    if tokenizer is not None and not tokenizer_file.is_file():
        raise ConversionError(f"--tokenizer {tokenizer_file}: not found")
    if tokenizer_file.is_file():
        tokens = tokenizer_vocab_size(tokenizer_file)
        if tokens > rows:
            raise ConversionError(
                f"tokenizer {tokenizer_file} has {tokens} tokens, more than the model's {rows} "
                "embedding rows"
            )
        divisor = vocab_divisor(tokens, rows, make_vocab_size_divisible_by)
        values.update(tokenizer_type="HFTokenizer", vocab_file=str(tokenizer_file.resolve()))
    else:
        # A training run's export often has weights and config only: convert those and leave
        # the tokenizer keys to the user (a checkpoint keeps its padded vocabulary).
        tokens = rows
        divisor = vocab_divisor(rows, rows, make_vocab_size_divisible_by)
        log(
            f"note: {hf_dir} has no tokenizer.json: weights and config converted, the tokenizer "
            f"is left to set (tokenizer_type and vocab_file, a tokenizer of at most {rows} "
            "tokens; or pass --tokenizer)"
        )
    values.update(make_vocab_size_divisible_by=divisor)
    origin = (
        f"{snapshot.repo_id}@{snapshot.revision} (commit {snapshot.commit})"
        if snapshot
        else str(hf_dir.resolve())
    )
    text = render_config(values, origin, arch.hf_class, output, rows)
    # The model alone, as a one-process run pads its vocabulary: no training config needed.
    config = model_config(values, pad_vocab_size(tokens, divisor, 1), str(hf_dir / "config.json"))

    with staged_folder(output) as staging:
        (staging / CONFIG_NAME).write_text(text)
        tensors = arch.to_strata(
            read_hf_tensors(hf_dir),
            expected_shapes(config),
            dims_for(config, rows),
            source=str(hf_dir),
            tied=not config.no_weight_tying,
        )
        source = snapshot.as_metadata() if snapshot else None
        save_weights_checkpoint(staging, tensors, {CONFIG_NAME: text}, source=source)
    if config_out is not None:
        atomic_write_text(config_out, text)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    origin = parser.add_mutually_exclusive_group(required=True)
    origin.add_argument("--input", help="Hugging Face model folder")
    origin.add_argument("--hf-model", help="a model on the Hub, namespace/name")
    parser.add_argument("--revision", help="with --hf-model: branch, tag or commit (default main)")
    parser.add_argument("--output", required=True, help="checkpoint folder to create")
    parser.add_argument("--config-out", help=f"also write the config here (always {CONFIG_NAME})")
    parser.add_argument("--tokenizer", help="tokenizer.json to use (default: the input's)")
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        help="pad the vocabulary to a multiple of this (default: keep the model's rows exactly)",
    )
    args = parser.parse_args(argv)
    if args.revision and not args.hf_model:
        parser.error("--revision needs --hf-model")

    def work() -> int | None:
        snapshot = None
        if args.hf_model:
            from megatron.hub.download import download_model

            snapshot = download_model(args.hf_model, args.revision)
            print(f"{args.hf_model}@{snapshot.revision}: commit {snapshot.commit}")
        out = convert_hf_to_neox(
            snapshot.folder if snapshot else args.input,
            args.output,
            args.config_out,
            args.tokenizer,
            args.make_vocab_size_divisible_by,
            snapshot=snapshot,
        )
        print(f"wrote {out} (config: {out / CONFIG_NAME})")
        return 0

    return exit_status(work, (ConversionError, HubError))


if __name__ == "__main__":
    sys.exit(main())
