"""Parallel layouts compute the single-process model: 20 fp32 steps through the real launcher
(deepy.py, gloo) per layout, every logged train loss within 1e-4 relative of (tp, pp, dp) =
(1, 1, 1) from the same seed and data, and the logged gradient norm equal too.

Each layout is one row of LAYOUTS; the reference run is shared by the module. The measured
relative differences are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _config_fixtures import layout_config, small_config, write_config
from conftest import run_tool

pytestmark = pytest.mark.timeout(1200)

STEPS = 20
REL_TOL = 1e-4
DROPOUT_STEPS = 10
DROPOUT_REL_TOL = 5e-3  # measured: 2.6e-4 over 10 steps
# The global batch is 8 samples in every layout: micro-batch 4 x data-parallel x accumulation.
MICRO_BATCH = 4
GLOBAL_BATCH = 8


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        extras = "".join(f"-{key}" for key in sorted(self.extra))
        return f"tp{self.tp}-pp{self.pp}-dp{self.dp}-zero{self.zero}{extras}"

    def overrides(self) -> dict[str, Any]:
        accumulation = GLOBAL_BATCH // (MICRO_BATCH * self.dp)
        return {**layout_config(self.tp, self.pp, self.dp, self.zero, accumulation), **self.extra}


MICRO_2 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}


LAYOUTS = [
    Layout(tp=2),
    Layout(tp=2, dp=2, zero=1),
    Layout(tp=2, extra={"sequence_parallel": True}),
    # Pipelines (DeepSpeed's PipelineModule, tied embeddings across the first and last stage).
    Layout(pp=2),
    Layout(pp=2, dp=2, zero=1),
    Layout(tp=2, pp=2, extra={"sequence_parallel": True}),
    Layout(tp=2, pp=2, dp=2, zero=0),
    # Activation checkpointing: the sequential model and pipeline stages recompute blocks.
    Layout(extra={"checkpoint_activations": True}),
    # ZeRO 2 and 3: pure data parallelism. Stage 3 partitions every parameter (layout_config
    # sets DeepSpeed's persistence threshold to 0); dp=4 takes micro-batches of 2.
    *[
        Layout(dp=dp, zero=zero, extra={} if dp == 2 else MICRO_2)
        for zero in (2, 3)
        for dp in (2, 4)
    ],
    # partition_activations: each tensor-parallel rank keeps 1/tp of a checkpointed input.
    Layout(
        tp=2,
        pp=2,
        dp=2,
        zero=1,
        extra={"checkpoint_activations": True, "partition_activations": True},
    ),
    Layout(tp=2, extra={"checkpoint_activations": True, "partition_activations": True}),
]


def train(tmp: Path, data: str, layout: Layout, **overrides: Any) -> dict[int, dict]:
    """Train through deepy.py; returns {iteration: train record}."""
    run = tmp / layout.name
    settings = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=32,
        # NeoX pads the vocabulary to a multiple of this x model_parallel_size: 256 gives
        # every layout here the same padded vocabulary, hence the same model.
        make_vocab_size_divisible_by=256,
        train_micro_batch_size_per_gpu=MICRO_BATCH,
        train_iters=STEPS,
        log_interval=1,
        eval_interval=1000,
        eval_iters=0,
        split="100,0,0",
        log_dir=str(run / "logs"),
        checkpoint_factor=0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gradient_clipping=0.5,
        weight_decay=0.01,
        warmup=0.1,
        seed=11,
    )
    values = small_config(data, **{**settings, **layout.overrides(), **overrides})
    run_tool("deepy.py", "train.py", write_config(run / "config.yml", values))
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["iteration"]: r for r in records if r["split"] == "train"}


def rel_diffs(run: dict[int, dict], reference: dict[int, dict], key: str) -> list[float]:
    assert run.keys() == reference.keys()
    return [abs(run[i][key] - reference[i][key]) / abs(reference[i][key]) for i in reference]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_dataset) -> dict[int, dict]:
    return train(tmp_path_factory.mktemp("reference"), text_dataset, Layout())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_layout_matches_single_process(tmp_path, text_dataset, reference, layout) -> None:
    run = train(tmp_path, text_dataset, layout)
    assert sorted(run) == list(range(1, STEPS + 1))
    losses = rel_diffs(run, reference, "lm_loss")
    norms = rel_diffs(run, reference, "grad_norm")
    print(f"\n{layout.name}: max rel loss diff {max(losses):.2e}, grad_norm {max(norms):.2e}")
    # Clipping at 0.5 is active: a layout-dependent norm would change the updates too.
    assert max(r["grad_norm"] for r in reference.values()) > 0.5
    assert max(losses) < REL_TOL, losses
    assert max(norms) < REL_TOL, norms
    assert reference[STEPS]["lm_loss"] < reference[1]["lm_loss"]


def test_dropout_under_tensor_parallelism_stays_close(tmp_path, text_dataset) -> None:
    """With dropout the layouts draw different attention masks (each tensor-parallel rank's
    heads use its own stream of the RNG tracker), so losses agree only statistically: within
    DROPOUT_REL_TOL of the single-process run, while hidden dropout (shared stream) and the
    data are identical."""
    dropout = dict(hidden_dropout=0.1, attention_dropout=0.1, train_iters=DROPOUT_STEPS)
    one = train(tmp_path / "one", text_dataset, Layout(), **dropout)
    two = train(tmp_path / "two", text_dataset, Layout(tp=2), **dropout)
    losses = rel_diffs(two, one, "lm_loss")
    print(f"\ndropout 0.1, tp2 vs tp1: max rel loss diff {max(losses):.2e}")
    assert max(losses) < DROPOUT_REL_TOL, losses
    assert min(losses) > 0.0  # the masks do differ: this is not the dropout-free model
