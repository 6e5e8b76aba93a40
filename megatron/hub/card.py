"""The model card (README.md) of a revision, from what the run left: the checkpoint's metadata
and config files, `{log_dir}/metrics.jsonl`, and lm-evaluation-harness results
(`*eval_results*.json`, as eval.py writes them) of the same step. Only redacted config text goes
in: credentials never reach a card."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.checkpoint.format import read_metadata, tag_for
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.loading import load_files
from megatron.neox_arguments.schema import default_of

MODEL_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "intermediate_size",
    "seq_length",
    "pos_emb",
    "norm",
    "activation",
    "tokenizer_type",
)
DATA_KEYS = ("data_path", "train_data_paths", "train_data_weights", "label_data_paths")


@dataclass
class RunRecords:
    """What the run logged, read once for all its revisions."""

    metrics: list[dict]
    evals: list[dict]

    @classmethod
    def read(cls, log_dirs: list[Path], eval_dirs: list[Path]) -> RunRecords:
        metrics = []
        for log_dir in log_dirs:
            path = log_dir / "metrics.jsonl"
            if path.is_file():
                metrics += [r for r in map(_record, path.read_text().splitlines()) if r]
        evals = []
        for folder in dict.fromkeys(eval_dirs):
            for path in sorted(folder.glob("*eval_results*.json")):
                try:
                    evals.append(json.loads(path.read_text()))
                except (OSError, json.JSONDecodeError):
                    continue  # not a results file after all
        return cls(metrics, evals)

    def final_losses(self, step: int) -> dict[str, dict]:
        """The last record of each split at or before `step`."""
        last: dict[str, dict] = {}
        for record in self.metrics:
            if record.get("iteration", math.inf) <= step and "lm_loss" in record:
                if record["iteration"] >= last.get(record["split"], {}).get("iteration", -1):
                    last[record["split"]] = record
        return last

    def eval_scores(self, step: int) -> list[tuple[str, str, float]]:
        """(task, metric, value) of the results recorded for checkpoint `step`."""
        rows = []
        for results in self.evals:
            if (results.get("strata") or {}).get("iteration") != step:
                continue
            for task, metrics in sorted((results.get("results") or {}).items()):
                for metric, value in metrics.items():
                    if isinstance(value, (int, float)) and "stderr" not in metric:
                        rows.append((task, metric.removesuffix(",none"), float(value)))
        return rows


def _record(line: str) -> dict | None:
    """One metrics line; None for a line cut short (a run still writing)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def config_of(folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(merged values, redacted text by file name) of the config files a checkpoint holds."""
    files = sorted((folder / "configs").glob("*"))
    raw = load_files(files, Problems())
    return raw.values, raw.config_files


def model_card(
    repo_id: str, folder: Path, fmt: str, records: RunRecords, architecture: str | None = None
) -> str:
    """`architecture`: the `transformers` class of the exported folder, when there is one."""
    metadata = read_metadata(folder)
    values, texts = config_of(folder)
    step = int(metadata["iteration"])
    parameters = sum(math.prod(shape) for shape in metadata.get("shapes", {}).values())
    seq_length = values.get("seq_length", default_of("seq_length"))
    samples = (metadata.get("train_state") or {}).get("consumed_train_samples", 0)
    layout = metadata.get("layout", {})

    lines = ["---", "tags:", "- strata", "- gpt-neox"]
    if fmt != "strata":
        lines.append("library_name: transformers")
    lines += ["---", "", f"# {repo_id.split('/')[1]} at {tag_for(step)}", ""]
    lines += [
        f"Trained with Strata (GPT-NeoX compatible). This revision, "
        f"`{tag_for(step)}`, is the checkpoint after {step:,} steps.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        *([f"| architecture | {architecture} |"] if architecture else []),
        f"| parameters | {parameters:,} (vocabulary padded to {metadata.get('padded_vocab_size')}) |",
        f"| dtype | {metadata.get('dtype')} |",
    ]
    lines += [f"| {key} | {values[key]} |" for key in MODEL_KEYS if values.get(key) is not None]
    lines += ["", "## Training", "", "| | |", "|---|---|", f"| iteration | {step:,} |"]
    lines.append(
        f"| tokens seen | {samples * seq_length:,} ({samples:,} samples of {seq_length}) |"
    )
    lines += [f"| {key} | {values[key]} |" for key in DATA_KEYS if values.get(key)]
    if layout:
        lines.append(
            f"| layout | {layout.get('world_size')} process(es): TP {layout.get('tensor_parallel_size')}"
            f", PP {layout.get('pipe_parallel_size')}, DP {layout.get('data_parallel_size')}, "
            f"ZeRO {layout.get('zero_stage', 0)} |"
        )
    losses = records.final_losses(step)
    if losses:
        lines += ["", "## Final losses", "", "| split | iteration | lm_loss |", "|---|---|---|"]
        lines += [
            f"| {split} | {r['iteration']} | {r['lm_loss']:.4f} |" for split, r in losses.items()
        ]
    scores = records.eval_scores(step)
    if scores:
        lines += ["", "## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {task} | {metric} | {value:.4f} |" for task, metric, value in scores]
    lines += ["", "## Use", ""] + _usage(repo_id, step, fmt)
    lines += ["", "## Config", ""]
    for name, text in texts.items():
        lines += [f"`{name}`:", "", "```yaml", text.rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _usage(repo_id: str, step: int, fmt: str) -> list[str]:
    lines = []
    if fmt != "strata":
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{tag_for(step)}")',
            "```",
        ]
    if fmt != "hf":
        lines += [
            "The Strata checkpoint (model, optimizer, RNG and data position) is under `strata/`:",
            "",
            "```python",
            "from huggingface_hub import snapshot_download",
            f'path = snapshot_download("{repo_id}", revision="{tag_for(step)}", '
            'allow_patterns="strata/*")',
            "```",
            "then train or evaluate with `load=<path>/strata`.",
        ]
    return lines
