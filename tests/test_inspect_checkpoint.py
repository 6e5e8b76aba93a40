"""tools/ckpts/inspect_checkpoint.py: layout, tensors with norms, diffs, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_tool

from megatron.checkpoint.save import save_weights_checkpoint

pytestmark = pytest.mark.timeout(120)

TOOL = "tools/ckpts/inspect_checkpoint.py"


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "embedding.word_embeddings.weight": torch.randn(16, 8, generator=generator),
        "final_norm.norm.weight": torch.ones(8),
        "lm_head.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
    }


@pytest.fixture
def ckpt(tmp_path) -> Path:
    save_weights_checkpoint(tmp_path / "a", tensors(), iteration=5)
    return tmp_path / "a"


def test_prints_layout_and_tensors_with_norms(ckpt):
    out = run_tool(TOOL, str(ckpt), "--tensors").stdout
    assert "iteration 5 (weights only)" in out
    assert "world_size 1" in out and "tensor_parallel_size 1" in out
    assert "model.safetensors: 3 tensors, 264 values" in out
    line = next(x for x in out.splitlines() if "embedding.word_embeddings.weight" in x)
    expected = tensors()["embedding.word_embeddings.weight"].norm().item()
    assert "16x8" in line and "float32" in line
    assert float(line.split("norm")[-1]) == pytest.approx(expected, rel=1e-5)
    assert "bfloat16" in next(x for x in out.splitlines() if "lm_head.weight" in x)


def test_a_global_step_folder_works_too(ckpt):
    out = run_tool(TOOL, str(ckpt / "global_step5")).stdout
    assert "iteration 5" in out and "norm" not in out  # no per-tensor lines without --tensors


def test_diff_reports_changes_and_missing_names(tmp_path, ckpt):
    changed = tensors()
    changed["final_norm.norm.weight"] = changed["final_norm.norm.weight"] + 0.25
    del changed["lm_head.weight"]
    changed["extra.weight"] = torch.zeros(2)
    save_weights_checkpoint(tmp_path / "b", changed, iteration=5)
    out = run_tool(TOOL, str(ckpt), "--diff", str(tmp_path / "b")).stdout
    norm_line = next(x for x in out.splitlines() if "final_norm.norm.weight" in x and "diff" in x)
    assert float(norm_line.split("max abs diff")[-1]) == pytest.approx(0.25)
    emb_line = next(x for x in out.splitlines() if "word_embeddings" in x and "diff" in x)
    assert float(emb_line.split("max abs diff")[-1]) == 0.0
    assert "missing in global_step5: lm_head.weight" in out
    assert "extra in global_step5: extra.weight" in out
    assert out.rstrip().endswith("tensors differ")
    same = run_tool(TOOL, str(ckpt), "--diff", str(ckpt)).stdout
    assert same.rstrip().endswith("tensors are identical")


def test_missing_checkpoint_is_an_error(tmp_path):
    result = run_tool(TOOL, str(tmp_path / "nowhere"), check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "nowhere" in result.stderr


def test_corrupt_file_is_an_error(ckpt):
    model = ckpt / "global_step5" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    result = run_tool(TOOL, str(ckpt), check=False)
    assert result.returncode == 1
    assert "error: cannot read" in result.stderr and "model.safetensors" in result.stderr


def test_bad_metadata_is_an_error(ckpt):
    (ckpt / "global_step5" / "metadata.json").write_text(json.dumps({"format_version": 99}))
    result = run_tool(TOOL, str(ckpt), check=False)
    assert result.returncode == 1 and "format_version 99" in result.stderr


def test_verify_checks_every_files_sha256(ckpt):
    out = run_tool(TOOL, str(ckpt), "--verify").stdout
    assert "verified: 1 files match their sha256" in out
    model = ckpt / "global_step5" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    result = run_tool(TOOL, str(ckpt), "--verify", check=False)
    assert result.returncode == 1
    assert "model.safetensors does not have the sha256" in result.stderr
