"""Export a Strata checkpoint as a GPT-NeoX (DeepSpeed) checkpoint folder.

    python tools/ckpts/export_neox.py --input CKPT_DIR --config FILE [FILE ...] --output OUT \
        [--tp N] [--layout sequential|pipeline] [--iteration N]

Writes OUT/global_step{N}/ (sequential: mp_rank_XX_model_states.pt per tensor-parallel rank,
the model under "module" with GPT-NeoX's names; pipeline: layer_XX-model_YY-model_states.pt per
layer and rank plus the mp_rank_XX_model_states.pt DeepSpeed's pipeline engine reads), OUT/latest
and OUT/config.yml, the model and tokenizer keys for that layout. GPT-NeoX's
tools/ckpts/convert_neox_to_hf.py --input_dir OUT/global_step{N} --config_file OUT/config.yml
reads it; GPT-NeoX itself loads the weights with `finetune: true` (no optimizer state is
exported). Nothing is written unless all succeeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron.checkpoint import read_metadata
from megatron.cli import exit_status
from megatron.conversion import ConversionError
from megatron.conversion.layouts import VOCAB_ROWS
from megatron.conversion.neox_io import LAYOUTS, client_state, write_checkpoint
from megatron.conversion.neox_layout import check_tensor_parallel, to_neox_layers
from megatron.conversion.strata_io import (
    architecture_values,
    configured_iteration,
    dims_for,
    expected_shapes,
    read_checkpoint,
    read_model,
)
from megatron.tokenizer import pad_vocab_size
from megatron.utils import staged_folder

CONFIG_NAME = "config.yml"
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "lm_head.weight")


def neox_vocab_divisor(tokens: int, rows: int, configured: int, tp: int) -> tuple[int, int]:
    """(make_vocab_size_divisible_by, padded rows) for GPT-NeoX at `tp`: NeoX pads the
    tokenizer's vocabulary to a multiple of divisor x tp. The configured divisor when it gives
    the checkpoint's rows, else one that does, else the configured one with zero rows added."""
    if pad_vocab_size(tokens, configured, tp) == rows:
        return configured, rows
    if rows % tp == 0:
        return rows // tp, rows
    padded = pad_vocab_size(tokens, configured, tp)
    if padded > rows:
        return configured, padded
    raise ConversionError(
        f"the checkpoint's {rows} vocabulary rows cannot be cut into {tp} equal shards"
    )


def _check(tensors: dict[str, torch.Tensor], expected: dict, source: Path) -> None:
    problems = [
        f"  {n}: in the checkpoint but not in the model" for n in tensors if n not in expected
    ]
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(f"  {name}: missing from the checkpoint (config expects {list(shape)})")
        elif tuple(tensors[name].shape) != tuple(shape):
            problems.append(
                f"  {name}: checkpoint has {list(tensors[name].shape)}, the config expects "
                f"{list(shape)}"
            )
    if problems:
        raise ConversionError(
            f"{source} does not match the configured model:\n" + "\n".join(problems)
        )


def neox_config(values: dict[str, Any], config, divisor: int, tp: int, layout: str) -> dict:
    """A GPT-NeoX YAML's keys: the model and tokenizer keys, the layout, and explicit values
    of the keys GPT-NeoX's converter reads with defaults of its own."""
    out = dict(values)
    out.update(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        norm=config.norm,
        activation=config.activation,
        pos_emb=config.pos_emb,
        rotary_pct=config.rotary_pct,
        rotary_emb_base=config.rotary_emb_base,
        gpt_j_residual=bool(config.gpt_j_residual),
        no_weight_tying=bool(config.no_weight_tying),
        make_vocab_size_divisible_by=divisor,
        model_parallel_size=tp,
        # GPT-NeoX: 0 is the sequential model (mp_rank files), 1 or more the pipeline files.
        pipe_parallel_size=0 if layout == "sequential" else 1,
    )
    if config.norm == "layernorm":
        out["layernorm_epsilon"] = config.layernorm_epsilon
    else:
        out["rms_norm_epsilon"] = config.rms_norm_epsilon
    if config.num_kv_heads not in (None, config.num_attention_heads):
        out["num_kv_heads"] = config.num_kv_heads
    if "intermediate_size" not in out and "expansion_factor" not in out:
        out["intermediate_size"] = config.ffn_hidden_size  # ungated: exactly the width
    return out


def _scheduler(metadata: dict) -> dict | None:
    """Strata's schedule position under GPT-NeoX's AnnealingLR keys."""
    state = metadata.get("scheduler")
    if not state:
        return None
    return {
        "start_lr": state["start_lr"],
        "warmup_iter": state["warmup_iters"],
        "num_iters": state["num_iters"],
        "end_iter": state["total_iters"],
        "decay_style": state["decay_style"],
        "min_lr": state["min_lr"],
    }


def export_neox(
    ckpt_dir: str | os.PathLike[str],
    config_files: list[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    tp: int = 1,
    layout: str = "sequential",
    iteration: int | None = None,
) -> Path:
    """Write the GPT-NeoX folder `output` (built beside it, renamed when complete)."""
    output = Path(output)
    if output.exists():
        raise ConversionError(f"output already exists: {output}")
    if layout not in LAYOUTS:
        raise ConversionError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if tp < 1:
        raise ConversionError(f"--tp {tp}: expected a tensor-parallel size of at least 1")
    config, keys, tokenizer = read_model(config_files)
    if iteration is None:
        iteration = configured_iteration(config_files)
    tensors, folder = read_checkpoint(ckpt_dir, iteration)
    metadata = read_metadata(folder)
    rows = tensors["embedding.word_embeddings.weight"].shape[0]
    divisor, neox_rows = neox_vocab_divisor(
        tokenizer.vocab_size, rows, int(keys.make_vocab_size_divisible_by), tp
    )
    _check(tensors, expected_shapes(dataclasses.replace(config, padded_vocab_size=rows)), folder)
    config = dataclasses.replace(config, padded_vocab_size=neox_rows)
    dims = dims_for(config, tokenizer.vocab_size)
    check_tensor_parallel(dims, tp, config.ffn_hidden_size, neox_rows)
    for name in VOCAB_TENSORS:  # zero rows up to NeoX's padded vocabulary
        if name in tensors:
            tensors[name] = VOCAB_ROWS.to_strata([tensors[name]], dims)
    layers = to_neox_layers(tensors, config, dims, tp)

    step = int(metadata["iteration"])
    consumed = (metadata.get("train_state") or {}).get("consumed_train_samples")
    values = neox_config(architecture_values(config_files), config, divisor, tp, layout)
    args = {
        key: values.get(key)
        for key in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")
    }
    args.update(
        make_vocab_size_divisible_by=divisor,
        padded_vocab_size=neox_rows,
        tokenizer_type=values.get("tokenizer_type"),
        model_parallel_size=tp,
    )
    header = (
        f"# GPT-NeoX config of the checkpoint {folder.resolve()}, exported by\n"
        f"# tools/ckpts/export_neox.py ({layout} layout, tensor parallel {tp}). Model and tokenizer\n"
        "# keys only: add your setup (data, optimizer, batch) and load the weights with\n"
        "# finetune: true (no optimizer state is exported).\n"
    )
    with staged_folder(output) as staging:
        client = client_state(step, tp, consumed, _scheduler(metadata), args)
        write_checkpoint(staging / f"global_step{step}", layers, tp, layout, client)
        (staging / "latest").write_text(f"global_step{step}")
        (staging / CONFIG_NAME).write_text(header + yaml.safe_dump(values, sort_keys=False))
    return output / f"global_step{step}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", required=True, help="Strata checkpoint folder (holding `latest`)"
    )
    parser.add_argument("--config", required=True, nargs="+", help="config file(s) of the model")
    parser.add_argument("--output", required=True, help="GPT-NeoX checkpoint folder to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--layout", choices=LAYOUTS, default="sequential", help="file layout")
    parser.add_argument(
        "--iteration",
        type=int,
        help="export global_step{N} instead of the one `latest` names (default: the config's "
        "iteration key, if set)",
    )
    args = parser.parse_args(argv)

    def work() -> int | None:
        out = export_neox(
            args.input, args.config, args.output, args.tp, args.layout, args.iteration
        )
        print(f"wrote {out} (config: {out.parent / CONFIG_NAME})")
        return 0

    return exit_status(work, (ConversionError,))


if __name__ == "__main__":
    sys.exit(main())
