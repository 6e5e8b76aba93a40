"""W&B run names from a template: `wandb_run_name: "{experiment}_{cluster}_{job_id}"`.

A field is any config key (`{train_iters}`, `{hidden_size}`, ...) or one of
    experiment  the first config file's name without its suffix (e.g. 125M for configs/125M.yml)
    cluster     the cluster profile ($STRATA_CLUSTER, set by the job scripts), else
                $SLURM_CLUSTER_NAME, else "local"
    job_id      $SLURM_JOB_ID (with _{task} for an array task), else "local"
    user        $USER
    date        the UTC start time, YYYYMMDD-HHMMSS
A field that is neither is a config error listing those that exist.
"""

from __future__ import annotations

import os
import string
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.rules import register_rule

RUN_FIELDS = ("experiment", "cluster", "job_id", "user", "date")


def template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def run_fields(args: Any, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    config_files = list(getattr(args, "config_files", None) or {})
    job = environ.get("SLURM_JOB_ID", "local")
    if environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{environ.get('SLURM_ARRAY_JOB_ID', job)}_{environ['SLURM_ARRAY_TASK_ID']}"
    values = args.values() if hasattr(args, "values") else vars(args)
    return {
        **values,
        "experiment": Path(config_files[0]).stem if config_files else "run",
        "cluster": environ.get("STRATA_CLUSTER") or environ.get("SLURM_CLUSTER_NAME", "local"),
        "job_id": job,
        "user": environ.get("USER", "user"),
        "date": time.strftime("%Y%m%d-%H%M%S", time.gmtime()),
    }


def run_name(args: Any, environ: Mapping[str, str] = os.environ) -> str | None:
    """The run's name from `wandb_run_name`, or None (W&B picks one) when it is unset."""
    template = getattr(args, "wandb_run_name", None)
    if not template:
        return None
    return template.format(**run_fields(args, environ))


@register_rule("wandb_run_name")
def _check_template(args: Any, problems: Problems) -> None:
    template = args.wandb_run_name
    if not template:
        return
    try:
        fields = template_fields(template)
    except ValueError as err:  # an unmatched brace
        problems.add(f"wandb_run_name{args.where('wandb_run_name')}: {err} in {template!r}")
        return
    unknown = [f for f in fields if f not in RUN_FIELDS and f not in args.values()]
    if unknown:
        problems.add(
            f"wandb_run_name{args.where('wandb_run_name')}: unknown field(s) "
            f"{', '.join(unknown)} in {template!r}; use {', '.join(RUN_FIELDS)} or a config key"
        )
