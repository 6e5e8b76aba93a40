"""Shared fixtures: the assets folder and a small real-text dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import megatron.config  # noqa: F401  (every config rule registered, as the entry points do)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets() -> Path:
    """$STRATA_ASSETS as an absolute path (tests link to it from temporary folders); tests that
    need it skip when it is unset."""
    root = os.environ.get("STRATA_ASSETS")
    if not root:
        pytest.skip("STRATA_ASSETS is not set")
    return Path(root).resolve()


def run_tool(*argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a repository script as users do, in a subprocess with the CPU settings."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory) -> str:
    """~300 KB of real text (this interpreter's standard library) as a bytes-tokenized
    NeoX dataset; returns the `data_path` prefix."""
    folder = tmp_path_factory.mktemp("text")
    corpus = folder / "corpus.jsonl"
    run_tool("tools/datasets/stdlib_corpus.py", "--output", str(corpus), "--max-bytes", "300000")
    run_tool(
        "tools/datasets/preprocess_data.py",
        "--input",
        str(corpus),
        "--output-prefix",
        str(folder / "corpus"),
        "--tokenizer-type",
        "bytes",
        "--append-eod",
    )
    return str(folder / "corpus_text_document")


@pytest.fixture(scope="session")
def smollm2_hf(assets: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face directory (fp32), made from the GGUF asset
    with tools/ckpts/gguf_to_hf.py once and cached under .cache/ (keyed by the file's size and
    mtime) because the conversion takes about 40 s."""
    gguf = assets / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    stat = gguf.stat()
    cache = Path(os.environ.get("STRATA_TEST_CACHE", REPO / ".cache" / "test-assets"))
    target = cache / f"smollm2-135m-instruct-hf-{stat.st_size}-{int(stat.st_mtime)}"
    if not (target / "config.json").is_file():
        from tools.ckpts.gguf_to_hf import gguf_to_hf

        try:
            gguf_to_hf(gguf, target)
        except (FileExistsError, OSError):
            # Another test process finished the same conversion first.
            if not (target / "config.json").is_file():
                raise
    return target
