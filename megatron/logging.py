"""Metrics sinks (console, JSON lines, TensorBoard, W&B) and FLOPs/MFU estimates.

Only global rank 0 writes. `{log_dir}/metrics.jsonl` gets one object per logged step.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def is_rank_0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print_rank_0(*message) -> None:
    if is_rank_0():
        print(*message, flush=True)


def flops_per_token(args) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward), counting matmuls only:
    dense weights (2 FLOPs per parameter per token), attention scores and values, and logits."""
    h, layers, s = args.hidden_size, args.num_layers, args.seq_length
    ffn = args.intermediate_size or 4 * h
    kv_heads = args.num_kv_heads or args.num_attention_heads
    kv_dim = h * kv_heads // args.num_attention_heads
    per_layer = 2 * (h * h + 2 * h * kv_dim + h * h) + 2 * 2 * h * ffn + 2 * 2 * s * h
    return 3.0 * (layers * per_layer + 2 * h * args.padded_vocab_size)


# Dense bf16 peak FLOP/s of known accelerators, for MFU; unknown hardware logs no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def wandb_config(args) -> dict | None:
    """The run's config as W&B stores it: every key except the config files' text, credential
    values redacted, no environment variables."""
    from megatron.neox_arguments.redact import redact_values

    if not hasattr(args, "values"):
        return None
    values = {k: v for k, v in args.values().items() if k != "config_files"}
    return json.loads(json.dumps(redact_values(values), default=str))


class MetricsLogger:
    """Writes a metrics dict to every configured sink."""

    def __init__(self, args):
        self.enabled = is_rank_0()
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if not self.enabled:
            return
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            self.jsonl = open(os.path.join(args.log_dir, "metrics.jsonl"), "a", buffering=1)
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir)
        if args.use_wandb:
            import wandb

            # WANDB_MODE=offline works without a network; runs sync later with `wandb sync`.
            self.wandb = wandb.init(
                project=args.wandb_project,
                group=args.wandb_group,
                entity=args.wandb_team,
                dir=args.log_dir,
                config=wandb_config(args),
            )

    def log(self, metrics: dict, scalars: dict | None = None) -> None:
        """One metrics.jsonl line; TensorBoard and W&B get `scalars` (default: the line's
        numbers) under `{split}/{name}`."""
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
        step, split = metrics["iteration"], metrics["split"]
        if scalars is None:
            scalars = {
                k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "iteration"
            }
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"{split}/{key}", value, step)
        if self.wandb:
            self.wandb.log({f"{split}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def console_line(metrics: dict, total_iters: int, eta_seconds: float | None) -> str:
    parts = [f"iter {metrics['iteration']:>6}/{total_iters}", f"{metrics['split']:<5}"]
    parts.append(f"loss {metrics['lm_loss']:.4f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.3e}")
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
    if "tokens_per_sec" in metrics:
        parts.append(f"tok/s {metrics['tokens_per_sec']:,.0f}")
    if "mfu" in metrics:
        parts.append(f"mfu {metrics['mfu']:.1%}")
    if eta_seconds is not None:
        parts.append(f"eta {format_eta(eta_seconds)}")
    return " | ".join(parts)


class Throughput:
    """Tokens per second over the iterations since the last report."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.tokens / elapsed
        self.start, self.tokens = time.perf_counter(), 0
        return rate, elapsed


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
