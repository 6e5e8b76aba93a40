"""Score a checkpoint on lm-evaluation-harness tasks, at the layout the config gives (tensor,
pipeline and data parallel):

    python deepy.py eval.py CONFIG.yml load=DIR "eval_tasks=[hellaswag_local,arc_easy_local]"
        [iteration=N] [eval_limit=N] [eval_num_fewshot=N] [eval_batch_size=N]
        [eval_include_path=[DIR]] [eval_results_prefix=PREFIX]

Tasks come from configs/eval_tasks/, the `eval_include_path` folders and the harness's own.
Rank 0 prints the harness's table and writes `{eval_results_prefix}_eval_results_{time}.json`:
the harness's results plus the checkpoint, its iteration and the config; with `log_dir` each
task's metrics are also appended to metrics.jsonl (and TensorBoard / W&B when configured).
Nothing downloads: the task data are local files.

Without `eval_tasks` it reports loss and perplexity on the config's valid and test data
(`eval_iters` iterations of each, or the whole split with `eval_iters=-1`), in the same file
under "results" -> split -> lm_loss, lm_loss_ppl, tokens, samples.
"""

from __future__ import annotations

import os

# Before the harness imports `datasets` and `huggingface_hub`, which read these once.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from megatron.checkpoint import resolve_checkpoint  # noqa: E402
from megatron.entry import run_entry_point  # noqa: E402
from megatron.evaluation.results import results_path, write_results  # noqa: E402
from megatron.inference import load_model  # noqa: E402
from megatron.logging import MetricsLogger, is_rank_0, wandb_config  # noqa: E402
from megatron.neox_arguments import ConfigError  # noqa: E402


@dataclass
class Scored:
    """One evaluation as rank 0 writes, prints and logs it (`results` is None elsewhere)."""

    results: dict | None
    iteration: int
    table: str
    log: Callable[[MetricsLogger], Any]


def main(args: Any) -> None:
    if not args.load:
        raise ConfigError("load: eval.py needs a checkpoint directory (load=DIR)")
    folder = resolve_checkpoint(args.load, args.iteration)  # before any slow work
    scored = score_tasks(args) if args.eval_tasks else score_perplexity(args)
    if not is_rank_0():
        return
    results = {
        **scored.results,
        "strata": {
            "checkpoint": str(folder.resolve()),
            "iteration": scored.iteration,
            "config": wandb_config(args),
        },
    }
    path = results_path(args.eval_results_prefix)
    write_results(path, results)
    print(scored.table, flush=True)
    print(f"wrote evaluation results to {path}", flush=True)
    metrics = MetricsLogger(args)
    scored.log(metrics)
    metrics.close()


def score_tasks(args: Any) -> Scored:
    from megatron.evaluation.harness import check_decoding, evaluate_tasks, log_results
    from megatron.evaluation.tasks import load_tasks, needs_generation

    tasks = load_tasks(list(args.eval_tasks), args.eval_include_path)
    model, tokenizer, metadata = load_model(args)
    check_decoding(tokenizer, needs_generation(tasks))
    results = evaluate_tasks(model, tokenizer, tasks, args)
    iteration = int(metadata["iteration"])
    if results is None:
        return Scored(None, iteration, "", lambda logger: None)
    from lm_eval.utils import make_table

    def log(logger: MetricsLogger) -> None:
        log_results(logger, results, iteration)

    return Scored(results, iteration, make_table(results), log)


def score_perplexity(args: Any) -> Scored:
    from megatron.evaluation.perplexity import evaluate_perplexity, perplexity_table

    model, tokenizer, metadata = load_model(args)
    splits = evaluate_perplexity(model, args, tokenizer.eod)
    iteration = int(metadata["iteration"])

    def log(logger: MetricsLogger) -> None:
        for split, figures in splits.items():
            logger.log({"iteration": iteration, "split": split, **figures})

    return Scored({"results": splits}, iteration, perplexity_table(splits), log)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
