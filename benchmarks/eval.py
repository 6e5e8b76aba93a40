"""Evaluation throughput: Strata's lm-evaluation-harness adapter against the harness's own
Hugging Face backend (`lm_eval --model hf`), on the same tasks and weights in the same run.

    .venv/bin/python benchmarks/eval.py [--hf-dir DIR] [--tasks arc_easy_local] [--limit 200]
        [--batch-size 16] [--threads N] [--rounds 3]

The weights are SmolLM2-135M-Instruct in fp32: --hf-dir (a Hugging Face folder, e.g. the test
suite's cached one under .cache/test-assets/) or, by default, the GGUF file in
$STRATA_ASSETS/models made into one with tools/ckpts/gguf_to_hf.py; Strata scores the checkpoint
tools/ckpts/convert_hf_to_neox.py makes of it. Both sides run the harness's simple_evaluate on
the local task YAMLs of configs/eval_tasks/ with the same limit and batch size, one after the
other, each timed over the whole evaluation (its requests built, scored and aggregated; model
loading excluded), for --rounds rounds with the order alternating. Prints one JSON object: each
side's requests/s at its median round, their ratio and both sides' metrics (which should
agree). Timings are reported, never checked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from megatron.checkpoint.load import load_checkpoint  # noqa: E402
from megatron.conversion.strata_io import model_args  # noqa: E402
from megatron.evaluation.adapter import StrataLM  # noqa: E402
from megatron.evaluation.tasks import STRATA_TASKS  # noqa: E402
from megatron.model import GPTModel, ModelConfig  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402
from tools.ckpts.convert_hf_to_neox import CONFIG_NAME, convert_hf_to_neox  # noqa: E402
from tools.ckpts.gguf_to_hf import gguf_to_hf  # noqa: E402

GGUF_NAME = "models/SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", type=Path, help="SmolLM2 Hugging Face folder")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy_local"])
    parser.add_argument("--limit", type=int, default=200, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (both sides)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, sides alternating")
    args = parser.parse_args(argv)
    if min(args.limit, args.batch_size, args.rounds) < 1:
        parser.error("--limit, --batch-size and --rounds must be at least 1")
    return args


def smollm2_folder(hf_dir: Path | None, scratch: Path) -> Path:
    if hf_dir is not None:
        if not (hf_dir / "config.json").is_file():
            raise SystemExit(f"error: --hf-dir {hf_dir} has no config.json")
        return hf_dir
    assets = os.environ.get("STRATA_ASSETS")
    if not assets:
        raise SystemExit("error: set STRATA_ASSETS or pass --hf-dir")
    return gguf_to_hf(Path(assets) / GGUF_NAME, scratch / "hf")


def strata_lm(hf_dir: Path, scratch: Path, batch_size: int) -> StrataLM:
    ckpt = convert_hf_to_neox(hf_dir, scratch / "strata")
    args = model_args([ckpt / CONFIG_NAME], load=str(ckpt))
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    load_checkpoint(args, model, None, None, load_rng=False)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    return StrataLM(model, tokenizer, args.seq_length, batch_size)


def hf_lm(hf_dir: Path, batch_size: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=batch_size, device="cpu")


def timed_evaluation(lm: Any, tasks: list[str], limit: int) -> tuple[float, dict[str, Any]]:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(STRATA_TASKS)])
    start = time.perf_counter()
    results = simple_evaluate(
        model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False
    )
    return time.perf_counter() - start, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        hf_dir = smollm2_folder(args.hf_dir, scratch)
        sides = {"strata": strata_lm(hf_dir, scratch, args.batch_size)}
        sides["hf"] = hf_lm(hf_dir, args.batch_size)
        report: dict[str, Any] = {
            "tasks": args.tasks,
            "limit": args.limit,
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
        }
        counters = {name: RequestCounter(lm) for name, lm in sides.items()}
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        scores: dict[str, Any] = {}
        for round_index in range(args.rounds):
            # Alternate which side goes first so drift in the machine's speed hits both.
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for name in order:
                elapsed, results = timed_evaluation(sides[name], args.tasks, args.limit)
                seconds[name].append(elapsed)
                scores[name] = {
                    task: {k: v for k, v in m.items() if "," in k and isinstance(v, float)}
                    for task, m in results["results"].items()
                }
        for name in sides:
            requests = counters[name].count // args.rounds
            median = statistics.median(seconds[name])
            report[name] = {
                "seconds_per_round": seconds[name],
                "median_seconds": median,
                "requests": requests,
                "requests_per_sec": requests / median,
                "scores": scores[name],
            }
        report["speedup"] = report["strata"]["requests_per_sec"] / report["hf"]["requests_per_sec"]
    print(json.dumps(report, indent=2))
    return 0


class RequestCounter:
    """Counts the requests the harness hands an LM (log-likelihood and generation alike)."""

    def __init__(self, lm: Any) -> None:
        self.count = 0
        for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            inner = getattr(lm, method)

            def counted(requests, *rest, _inner=inner, **kwargs):
                self.count += len(requests)
                return _inner(requests, *rest, **kwargs)

            setattr(lm, method, counted)


if __name__ == "__main__":
    sys.exit(main())
