"""Score a checkpoint on lm-evaluation-harness tasks, at the layout the config gives:

    python deepy.py eval.py CONFIG.yml load=DIR "eval_tasks=[hellaswag_local,arc_easy_local]"
        [iteration=N] [eval_limit=N] [eval_num_fewshot=N] [eval_batch_size=N]
        [eval_include_path=[DIR]] [eval_results_prefix=PREFIX]

Tasks come from configs/eval_tasks/, the `eval_include_path` folders and the harness's own.
Rank 0 prints the harness's table and writes `{eval_results_prefix}_eval_results_{time}.json`:
the harness's results plus the checkpoint, its iteration and the config; with `log_dir` each
task's metrics are also appended to metrics.jsonl (and TensorBoard / W&B when configured).
Nothing downloads: the task data are local files.
"""

from __future__ import annotations

import os

# Before the harness imports `datasets` and `huggingface_hub`, which read these once.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
from typing import Any  # noqa: E402

from megatron.checkpoint import resolve_checkpoint  # noqa: E402
from megatron.entry import run_entry_point  # noqa: E402
from megatron.logging import MetricsLogger, is_rank_0, wandb_config  # noqa: E402
from megatron.neox_arguments import ConfigError  # noqa: E402


def check_layout(args: Any) -> None:
    if args.pipe_parallel_size > 1:
        raise ConfigError(
            f"pipe_parallel_size={args.pipe_parallel_size}: eval.py runs tensor- and "
            "data-parallel layouts; evaluate with pipe_parallel_size 0 or 1 (any checkpoint "
            "loads at any layout)"
        )


def main(args: Any) -> None:
    if not args.load:
        raise ConfigError("load: eval.py needs a checkpoint directory (load=DIR)")
    if not args.eval_tasks:
        raise ConfigError("eval_tasks: name the lm-evaluation-harness tasks to score")
    check_layout(args)
    folder = resolve_checkpoint(args.load, args.iteration)  # before any slow work

    from megatron.evaluation.harness import check_decoding, evaluate_tasks, log_results
    from megatron.evaluation.results import results_path, write_results
    from megatron.evaluation.tasks import load_tasks, needs_generation
    from megatron.inference import load_model

    tasks = load_tasks(list(args.eval_tasks), args.eval_include_path)
    model, tokenizer, metadata = load_model(args)
    check_decoding(tokenizer, needs_generation(tasks))
    results = evaluate_tasks(model, tokenizer, tasks, args)
    if not is_rank_0():
        return
    from lm_eval.utils import make_table

    iteration = int(metadata["iteration"])
    results["strata"] = {
        "checkpoint": str(folder.resolve()),
        "iteration": iteration,
        "config": wandb_config(args),
    }
    path = results_path(args.eval_results_prefix)
    write_results(path, results)
    print(make_table(results), flush=True)
    print(f"wrote evaluation results to {path}", flush=True)
    metrics = MetricsLogger(args)
    log_results(metrics, results, iteration)
    metrics.close()


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
