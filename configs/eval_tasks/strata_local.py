"""Functions the task YAMLs in this folder name with `!function` (the harness imports this file
by path): the local-file loader and the harness's own HellaSwag preprocessing, unchanged."""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs

from megatron.evaluation.local_data import jsonl_validation

__all__ = ["hellaswag_process_docs", "jsonl_validation"]
