"""Through the real launcher: a blended run resumed on another data-parallel size continues at the
same global sample, and train_epochs derives the number of iterations from the data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from _config_fixtures import small_config, write_config, write_dataset
from conftest import run_tool
from test_training import losses, read_metrics

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.sample_index import epoch_samples

pytestmark = pytest.mark.timeout(900)


def launch(run: Path, **values) -> tuple[dict, str]:
    """Train through deepy.py; returns ({(iteration, split): record}, stdout)."""
    values.setdefault("log_dir", str(run / "logs"))
    config = write_config(run / "config.yml", small_config(None, **values))
    result = run_tool("deepy.py", "train.py", config)
    return read_metrics(run / "logs"), result.stdout


def copy_dataset(prefix: str, target: Path) -> str:
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, f"{target}{suffix}")
    return str(target)


def test_blended_run_resumes_on_another_data_parallel_size(tmp_path, text_dataset):
    a = copy_dataset(text_dataset, tmp_path / "a")
    b = copy_dataset(text_dataset, tmp_path / "b")
    common = dict(
        train_data_paths=[a, b],
        valid_data_paths=[a],
        test_data_paths=[b],
        train_data_weights=[2.0, 1.0],
        reset_position_ids=True,
        reset_attention_mask=True,
        train_iters=8,
        eval_interval=4,
        eval_iters=1,
        log_interval=1,
        seed=11,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        train_batch_size=8,
        train_micro_batch_size_per_gpu=4,
    )
    full, stdout = launch(tmp_path / "full", num_gpus=1, **common)
    assert "train data mixture (64 samples):" in stdout
    assert f"  {a}  " in stdout and " 0.6667 " in stdout and " 0.3333 " in stdout
    ckpt = tmp_path / "first" / "ckpt"
    first, _ = launch(tmp_path / "first", num_gpus=1, exit_interval=4, save=str(ckpt), **common)
    assert (ckpt / "latest").read_text() == "global_step4"
    second, _ = launch(tmp_path / "second", num_gpus=2, load=str(ckpt), **common)
    assert min(i for i, split in second if split == "train") == 5
    resumed = losses({**first, **second})
    expected = losses(full)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, rel=1e-5), key


def test_train_epochs_sets_the_iterations(tmp_path):
    rng = np.random.default_rng(3)
    documents = [list(rng.integers(0, 256, int(n))) + [256] for n in rng.integers(3, 40, 60)]
    prefix = write_dataset(tmp_path / "docs", documents)
    values = dict(
        data_path=prefix,
        split="100,0,0",
        train_epochs=2,
        eval_iters=0,
        log_interval=1,
        seq_length=32,
        pack_impl="pack_until_overflow",
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=True,
        train_iters=None,  # small_config sets it; train_epochs replaces it
    )
    metrics, stdout = launch(tmp_path / "run", **values)
    sizes = MMapIndexedDataset(prefix).sizes
    total = epoch_samples(sizes, 32, 1234, "pack_until_overflow", num_epochs=2)
    iters = total // 4
    assert f"train_epochs=2: {total:,} samples" in stdout and f"train_iters={iters}" in stdout
    train = sorted(i for i, split in metrics if split == "train")
    assert train == list(range(1, iters + 1))
    assert all(np.isfinite(metrics[(i, "train")]["lm_loss"]) for i in train)
