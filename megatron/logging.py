"""Metrics sinks (console, JSON lines, TensorBoard, W&B) and FLOPs/MFU estimates.

Only global rank 0 writes. `{log_dir}/metrics.jsonl` gets one object per logged step; a training
run also keeps `{log_dir}/run.json` (its length, checkpoint folder, job, process and whether it
finished) for tools/monitor.py.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time

import torch

from megatron.neox_arguments.schema import default_of


def is_rank_0() -> bool:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    # Before the process group exists: the launcher's variables (srun's where torch's are not).
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def print_rank_0(*message) -> None:
    if is_rank_0():
        print(*message, flush=True)


def flops_per_token(args) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward), counting matmuls only:
    dense weights (2 FLOPs per parameter per token), attention scores and values, and logits."""
    h, layers, s = args.hidden_size, args.num_layers, args.seq_length
    if args.model_type == "lstm":  # four gates, each an input and a hidden h x h matrix
        return 3.0 * (layers * 2 * 8 * h * h + 2 * h * args.padded_vocab_size)
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


def start_wandb(args, run_id: str | None = None):
    """A W&B run on `wandb_host` (WANDB_MODE=offline works without a network; such runs sync
    later with `wandb sync`), named by the `wandb_run_name` template; `run_id` continues that
    run (a resumed or requeued job). With wandb_init_all_ranks the runs of one job share
    `wandb_group` and their names end in the rank. The API key comes from the environment or
    `wandb login` only; when W&B cannot start online (no login, no network) the run logs
    offline instead, with a warning."""
    import wandb

    from megatron.run_naming import run_name

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    name = run_name(args)
    if args.wandb_init_all_ranks:
        name = f"{name}-rank{rank}" if name else f"rank{rank}"
    settings = dict(
        project=args.wandb_project,
        group=args.wandb_group,
        entity=args.wandb_team,
        name=name,
        id=run_id,
        resume="allow" if run_id else None,
        # YAML reads `[baseline, 2]` as a string and a number; W&B takes strings
        tags=[str(tag) for tag in getattr(args, "wandb_tags", None) or []] or None,
        notes=getattr(args, "wandb_notes", None),
        dir=args.log_dir,
        config=wandb_config(args),
        settings=wandb.Settings(base_url=args.wandb_host)
        if args.wandb_host != default_of("wandb_host")
        else None,
    )
    try:
        return wandb.init(**settings)
    except wandb.errors.Error as err:
        if os.environ.get("WANDB_MODE") == "offline":
            raise
        warn(
            f"W&B could not start online ({err}); logging offline under {args.log_dir or '.'} "
            "instead (upload later with `wandb sync`)"
        )
        return wandb.init(**settings, mode="offline")


class MetricsLogger:
    """Writes a metrics dict to every configured sink (rank 0; with wandb_init_all_ranks every
    rank starts a W&B run too, so each records its own system metrics)."""

    def __init__(self, args, run_file: bool = False, wandb_run_id: str | None = None):
        self.enabled = is_rank_0()
        self.run_file = None
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if args.use_wandb and (self.enabled or args.wandb_init_all_ranks):
            self.wandb = start_wandb(args, wandb_run_id if self.enabled else None)
        if not self.enabled:
            return
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            self.jsonl = open(os.path.join(args.log_dir, "metrics.jsonl"), "a", buffering=1)
            if run_file:
                self.run_file = os.path.join(args.log_dir, RUN_FILE)
                self._describe_run(args)
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir)

    def log(self, metrics: dict, scalars: dict | None = None) -> None:
        """One metrics.jsonl line; TensorBoard and W&B get `scalars` (default: the line's
        numbers) under `{split}/{name}`."""
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({**metrics, "time": round(time.time(), 3)}) + "\n")
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

    def _describe_run(self, args) -> None:
        record = {
            "train_iters": args.train_iters,
            "save": os.path.abspath(args.save) if args.save else None,
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": round(time.time(), 3),
            "state": "running",
        }
        write_json(self.run_file, record)

    def finish(self, state: str) -> None:
        """Record how the run ended in run.json ("finished", or "stopped" before train_iters)
        and close the sinks."""
        if self.run_file:
            with open(self.run_file) as handle:
                record = json.load(handle)
            write_json(self.run_file, {**record, "state": state, "ended": round(time.time(), 3)})
        self.close()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def write_json(path: str, record: dict) -> None:
    """`record` at `path`, whole or not at all (a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(tmp, path)


RUN_FILE = "run.json"


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
