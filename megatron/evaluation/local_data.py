"""Task data from local JSON-lines files, so evaluation never downloads: a task YAML names the
file with environment variables (`data_files: ${STRATA_ASSETS}/eval/x.jsonl`) and this loader,
as its `custom_dataset`, expands them."""

from __future__ import annotations

import os
from typing import Any


def jsonl_validation(data_files: str, **_metadata: Any) -> Any:
    """A DatasetDict whose `validation` split is the rows of `data_files`."""
    import datasets

    path = os.path.expandvars(data_files)
    if "$" in path:
        raise FileNotFoundError(
            f"task data file {data_files}: an environment variable in it is not set"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task data file {path} does not exist (data_files: {data_files})")
    return datasets.load_dataset("json", data_files={"validation": path})
