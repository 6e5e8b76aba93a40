"""Import a GPT-NeoX (DeepSpeed) checkpoint as a Strata checkpoint plus a NeoX-format config.

    python tools/ckpts/import_neox.py --input NEOX_DIR --config NEOX.yml [NEOX.yml ...] \
        --output CKPT_DIR [--iteration N] [--with-optimizer]

NEOX_DIR is a GPT-NeoX save directory (its `latest` names the checkpoint; --iteration or the
config's `iteration` key picks another) or one global_step{N} folder, in the sequential
(mp_rank_XX_model_states.pt) or pipeline (layer_XX-model_YY-model_states.pt) layout at any
tensor-parallel size, with today's or older GPT-NeoX MLP names. CKPT_DIR gets a Strata
checkpoint of the weights that records the NeoX run's iteration and data position, and
config.yml with the model and tokenizer keys. Continue the run with that config plus your
setup and `load: CKPT_DIR`, `no_load_optim: true`; `finetune: true` starts from step 0
instead. With --with-optimizer the ZeRO optimizer state comes too, made per-parameter by
DeepSpeed's universal-checkpoint conversion (ds_to_universal), and the run continues with
`load: CKPT_DIR` alone (the RNG states are not carried over). Nothing is written unless all
succeeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from megatron.checkpoint.save import save_weights_checkpoint
from megatron.cli import exit_status
from megatron.conversion import ConversionError
from megatron.conversion.neox_io import read_checkpoint, read_optimizer_states, resolve_folder
from megatron.conversion.neox_layout import embedding_layer, from_neox_layers
from megatron.conversion.strata_io import (
    architecture_values,
    configured_iteration,
    dims_for,
    expected_shapes,
    read_model,
)
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.loading import load_files
from megatron.utils import staged_folder
from tools.ckpts.convert_hf_to_neox import vocab_divisor

CONFIG_NAME = "config.yml"


def _setting(config_files: list[str | os.PathLike[str]], key: str) -> Any:
    return load_files(list(config_files), Problems()).values.get(key)


def train_state(client: dict[str, Any], step_from_tag: int, config_files: list) -> dict[str, int]:
    """The iteration and data position the NeoX checkpoint records: GPT-NeoX's `iteration`
    (else DeepSpeed's global_steps, else the folder's step) and DeepSpeed's global_samples
    (else iteration x train_batch_size of the config, as GPT-NeoX's loader skips)."""
    iteration = client.get("iteration", client.get("global_steps", step_from_tag))
    consumed = client.get("global_samples")
    if consumed is None:
        batch = _setting(config_files, "train_batch_size")
        if batch is None:
            micro = _setting(config_files, "train_micro_batch_size_per_gpu")
            accumulation = _setting(config_files, "gradient_accumulation_steps") or 1
            data_parallel = client.get("dp_world_size", 1)
            batch = micro * accumulation * data_parallel if micro else None
        consumed = iteration * batch if batch else 0
    return {
        "iteration": int(iteration),
        "consumed_train_samples": int(consumed),
        "consumed_valid_samples": 0,
    }


def import_neox(
    neox_dir: str | os.PathLike[str],
    config_files: list[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    iteration: int | None = None,
    with_optimizer: bool = False,
) -> tuple[Path, dict[str, int]]:
    """Write the Strata checkpoint folder `output`; returns it and the train state recorded."""
    output = Path(output)
    if output.exists():
        raise ConversionError(f"output already exists: {output}")
    if iteration is None:
        iteration = configured_iteration(config_files)
    folder = resolve_folder(neox_dir, iteration)
    config, keys, tokenizer = read_model(config_files)
    checkpoint = read_checkpoint(folder)
    configured_tp = _setting(config_files, "model_parallel_size")
    if configured_tp not in (None, checkpoint.tensor_parallel):
        raise ConversionError(
            f"config {', '.join(map(str, config_files))}: model_parallel_size {configured_tp}, but "
            f"{folder} holds {checkpoint.tensor_parallel} tensor-parallel ranks"
        )
    embedding = checkpoint.layers.get(embedding_layer(), [{}])
    shards = [state.get("word_embeddings.weight") for state in embedding]
    if any(shard is None for shard in shards):
        raise ConversionError(f"{folder}: layer 0 has no word_embeddings.weight (the embedding)")
    rows = sum(shard.shape[0] for shard in shards)
    if rows < tokenizer.vocab_size:
        raise ConversionError(
            f"{folder}: the embedding has {rows} rows, fewer than the tokenizer's "
            f"{tokenizer.vocab_size} tokens"
        )
    config = dataclasses.replace(config, padded_vocab_size=rows)
    expected, dims = expected_shapes(config), dims_for(config, tokenizer.vocab_size)
    layout = f"{checkpoint.layout} layout, tensor parallel {checkpoint.tensor_parallel}"
    tensors = from_neox_layers(
        checkpoint.layers,
        expected,
        config,
        dims,
        source=f"{folder} ({layout})",
        legacy_gqa=checkpoint.legacy_names,
    )
    step = int(folder.name.removeprefix("global_step")) if folder.name[11:].isdigit() else 0
    state = train_state(checkpoint.client_state, step, config_files)

    values = architecture_values(config_files)
    values["make_vocab_size_divisible_by"] = vocab_divisor(tokenizer.vocab_size, rows, None)
    text = (
        f"# GPT-NeoX checkpoint {folder.resolve()} ({checkpoint.layout}, tensor parallel "
        f"{checkpoint.tensor_parallel}),\n# imported by tools/ckpts/import_neox.py at iteration "
        f"{state['iteration']}. Model and tokenizer keys only: combine with a setup config and\n"
        f"# continue with load: {output.resolve()} and no_load_optim: true.\n"
    ) + yaml.safe_dump(values, sort_keys=False)
    with staged_folder(output) as staging:
        optimizer, step = {}, 0
        if with_optimizer:
            optimizer, step = _optimizer(folder, checkpoint, expected, config, dims, staging)
        (staging / CONFIG_NAME).write_text(text)
        save_weights_checkpoint(
            staging,
            tensors,
            {CONFIG_NAME: text},
            state["iteration"],
            state,
            optimizer=optimizer,
            optimizer_step=step,
            scheduler={"num_iters": state["iteration"]},
        )
    return output, state


def _optimizer(folder, checkpoint, expected, config, dims, staging: Path):
    """Strata's optimizer tensors ("{name}.exp_avg", "{name}.exp_avg_sq", and "{name}.master"
    for a model not in fp32) and step, from the ZeRO state through ds_to_universal."""
    work = staging / ".universal"
    states, step = read_optimizer_states(folder, checkpoint.tensor_parallel, work)
    optimizer = {}
    for state, layers in states.items():
        tensors = from_neox_layers(
            layers,
            expected,
            config,
            dims,
            source=f"{folder} optimizer state {state!r} (from ds_to_universal)",
            moments=state != "fp32",
            legacy_gqa=checkpoint.legacy_names,
        )
        key = "master" if state == "fp32" else state
        for name, tensor in tensors.items():
            optimizer[f"{name}.{key}"] = tensor.float()
    shutil.rmtree(work)
    return optimizer, step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="GPT-NeoX save or global_step folder")
    parser.add_argument("--config", required=True, nargs="+", help="the NeoX run's config file(s)")
    parser.add_argument("--output", required=True, help="Strata checkpoint folder to create")
    parser.add_argument(
        "--iteration",
        type=int,
        help="import global_step{N} instead of the one `latest` names (default: the config's "
        "iteration key, if set)",
    )
    parser.add_argument(
        "--with-optimizer",
        action="store_true",
        help="also import the ZeRO optimizer state (through DeepSpeed's ds_to_universal)",
    )
    args = parser.parse_args(argv)

    def work() -> int | None:
        out, state = import_neox(
            args.input, args.config, args.output, args.iteration, args.with_optimizer
        )
        print(
            f"wrote {out} (config: {out / CONFIG_NAME}; iteration {state['iteration']}, "
            f"{state['consumed_train_samples']} samples consumed)"
        )
        return 0

    return exit_status(work, (ConversionError,))


if __name__ == "__main__":
    sys.exit(main())
