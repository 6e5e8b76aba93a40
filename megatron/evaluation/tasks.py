"""Finding and loading lm-evaluation-harness tasks: Strata's configs/eval_tasks/, the folders in
`eval_include_path`, then the harness's own. Every problem is found before the model loads."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from megatron.neox_arguments import ConfigError

STRATA_TASKS = Path(__file__).resolve().parents[2] / "configs" / "eval_tasks"


def include_paths(extra: list[str] | None) -> list[Path]:
    """Strata's task folder and the user's, each checked to be a folder."""
    paths = [STRATA_TASKS]
    for folder in extra or []:
        if not Path(folder).is_dir():
            raise ConfigError(f"eval_include_path: {folder} is not a folder of task YAMLs")
        paths.append(Path(folder))
    return paths


def task_manager(extra: list[str] | None) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include_paths(extra)])


def check_names(names: list[str], manager: Any, extra: list[str] | None) -> None:
    """An unknown task name is an error listing the closest known names and where we looked."""
    known = manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            where = ", ".join(str(p) for p in include_paths(extra))
            raise ConfigError(
                f"eval_tasks: unknown task {name!r}"
                + (f"; closest: {', '.join(close)}" if close else "")
                + f" (looked in {where} and lm-evaluation-harness's own tasks)"
            )


def load_tasks(names: list[str], extra: list[str] | None) -> dict[str, Any]:
    """{task name: task} with their data read (a missing data file is an error naming it)."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(extra)
    check_names(names, manager, extra)
    return get_task_dict(names, manager)


def leaf_tasks(tasks: dict) -> list[Any]:
    """The tasks of a (possibly grouped) task dict."""
    found = []
    for value in tasks.values():
        found.extend(leaf_tasks(value) if isinstance(value, dict) else [value])
    return found


def needs_generation(tasks: dict) -> list[str]:
    """Names of the tasks that generate text (and so decode tokens)."""
    return [task.config.task for task in leaf_tasks(tasks) if task.OUTPUT_TYPE == "generate_until"]
