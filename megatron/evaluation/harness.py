"""One evaluation: the harness's tasks scored on a loaded model, logged on rank 0. Used by
eval.py and, every `eval_tasks_interval` iterations, by training."""

from __future__ import annotations

from typing import Any

import torch

from megatron.evaluation.adapter import StrataLM
from megatron.evaluation.results import metric_records
from megatron.neox_arguments import ConfigError
from megatron.tokenizer.chat import load_chat_template


def check_decoding(tokenizer: Any, generating: list[str]) -> None:
    """Generation tasks need a tokenizer that turns ids back into text."""
    if not generating:
        return
    try:
        tokenizer.detokenize(tokenizer.tokenize("a"))
    except (NotImplementedError, ValueError) as err:
        raise ConfigError(
            f"eval_tasks {', '.join(generating)} generate text, but tokenizer "
            f"{tokenizer.name} cannot decode token ids: {err}"
        ) from err


def evaluate_tasks(
    model: torch.nn.Module, tokenizer: Any, tasks: dict[str, Any], args: Any
) -> dict[str, Any] | None:
    """The harness's results dict on data-parallel rank 0 (None elsewhere)."""
    from lm_eval.evaluator import simple_evaluate

    from megatron.evaluation.tasks import leaf_tasks

    chat = None
    if args.eval_apply_chat_template:
        key = "eval_apply_chat_template"
        chat = load_chat_template(key, args.tokenizer_type, args.vocab_file)
    lm = StrataLM(model, tokenizer, args.seq_length, args.eval_batch_size, chat, args.seed)
    was_training = model.training
    model.eval()
    try:
        return simple_evaluate(
            model=lm,
            tasks=leaf_tasks(tasks),
            num_fewshot=args.eval_num_fewshot,
            limit=args.eval_limit,
            log_samples=False,
            apply_chat_template=args.eval_apply_chat_template,
            # Leave the global RNGs alone (training continues from them); seed the few-shot draws.
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
            fewshot_random_seed=args.seed,
        )
    finally:
        model.train(was_training)


def log_results(metrics_logger: Any, results: dict[str, Any], iteration: int) -> list[dict]:
    """Each task's metrics to metrics.jsonl (and TensorBoard / W&B as eval/{task}/{metric});
    returns the records."""
    records = metric_records(results, iteration)
    for record in records:
        name = f"{record['task']}/{record['metric']}"
        metrics_logger.log(record, scalars={name: record["value"]})
    return records
