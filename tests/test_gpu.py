"""The CUDA path, on one GPU (marked `gpu`; skipped without CUDA; benchmarks/gpu/run.sh runs
them on a lent machine): bf16 training through the launcher with ZeRO 0-3, activation
checkpointing and torch.compile; SDPA's flash kernel against its math kernel; KV-cached
generation against the full forward; checkpoints moving between CUDA and CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _config_fixtures import small_config, write_config
from _model_fixtures import make_args
from conftest import REPO

from megatron.model import GPTModel, ModelConfig
from megatron.model.attention_backends import AttentionOptions, build_attention_backend
from megatron.model.kv_cache import KVCache
from megatron.text_generation import generate_batch
from megatron.utils import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.timeout(900),
]

ITERS = 40
# Runs launched together (one GPU holds them all): name -> overrides of the bf16 base run.
RUNS = {
    "zero0": {"zero_optimization": {"stage": 0}},
    "zero1": {"zero_optimization": {"stage": 1}},
    "zero2": {"zero_optimization": {"stage": 2}},
    "zero3": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
    "checkpointed": {"zero_optimization": {"stage": 1}, "checkpoint_activations": True},
    "compiled": {"zero_optimization": {"stage": 1}, "torch_compile": True},
    # Stops at ITERS / 2; test_resume_on_cuda continues it.
    "first_half": {"zero_optimization": {"stage": 1}, "exit_interval": ITERS // 2},
}


def run_config(run: Path, data: str, **overrides) -> Path:
    values = small_config(
        data,
        num_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        seq_length=256,
        max_position_embeddings=256,
        train_micro_batch_size_per_gpu=8,
        train_iters=ITERS,
        precision="bf16",
        optimizer={"type": "Adam", "params": {"lr": 2.0e-3, "betas": [0.9, 0.95]}},
        warmup=0.05,
        gradient_clipping=1.0,
        log_interval=1,
        eval_interval=ITERS,
        eval_iters=2,
        split="95,5,0",
        log_dir=str(run / "logs"),
        save=str(run / "ckpt"),
        checkpoint_factor=ITERS // 2,
        master_port=free_port(),
        seed=11,
        **overrides,
    )
    return Path(write_config(run / "config.yml", values))


def launch(config: Path) -> subprocess.Popen:
    """Start a training run on the GPU; its output goes to launch.log beside the config."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DS_ACCELERATOR": "cuda", "PYTHONPATH": path}
    with open(config.parent / "launch.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "deepy.py", "train.py", str(config)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait(process: subprocess.Popen, config: Path) -> None:
    code = process.wait(timeout=800)
    if code != 0:
        log = (config.parent / "launch.log").read_text()
        raise AssertionError(f"{config} exited {code}:\n{log[-4000:]}")


def train_losses(run: Path) -> dict[int, float]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["lm_loss"] for r in map(json.loads, lines) if r["split"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_dataset) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-runs")
    configs = {name: run_config(root / name, text_dataset, **o) for name, o in RUNS.items()}
    processes = {name: launch(config) for name, config in configs.items()}
    for name, process in processes.items():
        wait(process, configs[name])
    return {name: config.parent for name, config in configs.items()}


def test_bf16_training_on_cuda_lowers_the_loss_and_reports_mfu(runs):
    lines = (runs["zero0"] / "logs" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["split"] == "train"]
    assert len(train) == ITERS
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 1.5
    assert all(0.0 < r["grad_norm"] < 100.0 for r in train)
    if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name():
        assert 0.0 < train[-1]["mfu"] < 1.0
    assert (runs["zero0"] / "ckpt" / "latest").read_text() == f"global_step{ITERS}"


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "checkpointed", "compiled"])
def test_layouts_and_options_follow_zero0(runs, name):
    """Every ZeRO stage, recomputation and compiled blocks train the same model. Measured on an
    H200, the first ten steps agree to 1e-4; then bf16 rounding differences (flattened vs
    per-tensor clipping, flash attention's atomics) grow chaotically, single steps wander by up
    to a third and only the trend stays together (the last quarter's mean within 0.6%)."""
    reference, other = train_losses(runs["zero0"]), train_losses(runs[name])
    assert other.keys() == reference.keys()
    curves = f"zero0 {reference}\n{name} {other}"
    for iteration in range(1, 11):
        assert other[iteration] == pytest.approx(reference[iteration], rel=5e-3), curves
    last = sorted(reference)[-ITERS // 4 :]
    mean_other = sum(other[i] for i in last) / len(last)
    mean_reference = sum(reference[i] for i in last) / len(last)
    assert mean_other == pytest.approx(mean_reference, rel=0.015), curves


def test_resume_on_cuda_continues_the_run(runs, tmp_path):
    first = runs["first_half"]
    assert (first / "ckpt" / "latest").read_text() == f"global_step{ITERS // 2}"
    overrides = {**RUNS["first_half"], "exit_interval": None, "load": str(first / "ckpt")}
    config = run_config(tmp_path / "second_half", _data_path(first), **overrides)
    wait(launch(config), config)
    resumed = train_losses(tmp_path / "second_half")
    uninterrupted = train_losses(runs["zero1"])
    assert min(resumed) == ITERS // 2 + 1
    # Flash attention's backward accumulates with atomics: equal to bf16 noise, not bitwise.
    for iteration, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[iteration], rel=0.02), iteration


def _data_path(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yml").read_text())["data_path"]


def test_checkpoint_moves_between_cuda_and_cpu(runs, tmp_path):
    """A checkpoint written on CUDA loads on the CPU with the same weights and logits (fp32);
    written again from the CPU, it loads back on CUDA unchanged."""
    from megatron.checkpoint.load import load_checkpoint
    from megatron.checkpoint.parameters import canonical_named_parameters
    from megatron.checkpoint.save import save_weights_checkpoint
    from megatron.conversion.strata_io import model_args

    args = model_args([runs["zero0"] / "config.yml"])
    args.load = str(runs["zero0"] / "ckpt")

    def loaded(device: str) -> GPTModel:
        model = GPTModel(ModelConfig.from_neox(args)).to(device).eval()
        load_checkpoint(args, model, None, None, load_rng=False)
        return model

    on_cpu, on_cuda = loaded("cpu"), loaded("cuda")
    for (name, a), (_, b) in zip(on_cpu.state_dict().items(), on_cuda.state_dict().items()):
        assert torch.equal(a, b.cpu()), name
    tokens = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        cpu_logits = on_cpu(tokens)
        cuda_logits = on_cuda(tokens.cuda()).cpu()
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-3, atol=1e-3)

    tensors = dict(canonical_named_parameters(on_cpu))
    save_weights_checkpoint(tmp_path / "back", tensors)
    args.load = str(tmp_path / "back")
    back = loaded("cuda")
    for (name, a), (_, b) in zip(on_cuda.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


# -- kernels and generation in one process -------------------------------------------------------


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.detach().float() - reference).norm() / reference.norm())


@pytest.mark.parametrize("kv_heads", [16, 4], ids=["mha", "gqa"])
def test_sdpa_flash_matches_math(kv_heads):
    """The default causal attention runs on SDPA's flash kernel (only that kernel is allowed
    here) and agrees with the math kernel, forward and gradients, to bf16 accuracy."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = 16, 64
    options = AttentionOptions(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, scale=dim**-0.5
    )
    attention = build_attention_backend("sdpa", options)
    generator = torch.Generator(device="cuda").manual_seed(0)

    def tensor(h: int) -> torch.Tensor:
        x = torch.randn(2, h, 1024, dim, device="cuda", generator=generator)
        return x.to(torch.bfloat16).requires_grad_()

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    grad_out = torch.randn(2, heads, 1024, dim, device="cuda", generator=generator)

    def run(backend: SDPBackend, *inputs: torch.Tensor) -> list[torch.Tensor]:
        with sdpa_kernel([backend]):
            out = attention(*inputs, None, 0.0)
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
        return [out, *grads]

    flash = run(SDPBackend.FLASH_ATTENTION, q, k, v)
    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference = run(SDPBackend.MATH, *fp32)
    math_bf16 = run(SDPBackend.MATH, q, k, v)
    # bf16 keeps 8 bits of mantissa: rounding alone gives relative errors of a few 1e-3.
    for name, a, b, ref in zip(("out", "dq", "dk", "dv"), flash, math_bf16, reference):
        error, math_error = _relative_error(a, ref.detach()), _relative_error(b, ref.detach())
        assert error < 1.5e-2, (name, error, math_error)


def _tiny_generator_model(dtype: torch.dtype, **overrides) -> GPTModel:
    settings = dict(no_weight_tying=True, init_method_std=0.3, seq_length=64)
    torch.manual_seed(0)
    return (
        GPTModel(ModelConfig.from_neox(make_args(**{**settings, **overrides})))
        .to("cuda", dtype)
        .eval()
    )


@pytest.mark.parametrize("overrides", [{}, {"num_kv_heads": 2}], ids=["mha", "gqa"])
def test_cached_generation_equals_full_forward_on_cuda(overrides):
    prompts = [[5, 17, 3, 99, 42, 8, 61], [12], [7, 7, 30, 2]]
    model = _tiny_generator_model(torch.float32, **overrides)
    cached = generate_batch(model, prompts, 16, 64, 100, use_cache=True)
    recomputed = generate_batch(model, prompts, 16, 64, 100, use_cache=False)
    assert [r.tokens for r in cached] == [r.tokens for r in recomputed]
    # bf16: each cached step's logits equal the full forward's over the same tokens.
    model = _tiny_generator_model(torch.bfloat16, **overrides)
    tokens = torch.tensor([cached[0].tokens[:12]], device="cuda")
    cache = KVCache(12)
    with torch.no_grad():
        full = model(tokens).float()
        steps = [model(tokens[:, :4], kv_cache=cache)]
        steps += [model(tokens[:, i : i + 1], kv_cache=cache) for i in range(4, 12)]
    incremental = torch.cat(steps, dim=1).float()
    assert _relative_error(incremental, full) < 2e-2
    assert F.cosine_similarity(incremental.flatten(), full.flatten(), dim=0) > 0.999
