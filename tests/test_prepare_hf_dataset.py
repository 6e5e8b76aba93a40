"""tools/datasets/prepare_hf_dataset.py: a dataset pushed to a local Hub (tests/_hub_server.py)
and pulled back through `datasets` tokenizes to exactly its documents; local folders, chat data,
--count-only, --skip-export/--skip-tokenize and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _hub_server import HubServer
from conftest import REPO

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.tokenizer import build_tokenizer

datasets = pytest.importorskip("datasets")
pytest.importorskip("huggingface_hub")
pytestmark = pytest.mark.timeout(600)

TEXTS = ["The first document.", "A second, longer document with more words.", "Third."]


def prepare(tmp: Path, *argv: str, endpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.update(HF_HOME=str(tmp / "hf-home"), HF_HUB_DISABLE_XET="1")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    else:
        env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "tools/datasets/prepare_hf_dataset.py", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def documents(prefix: Path) -> list[list[int]]:
    data = MMapIndexedDataset(str(prefix))
    return [np.asarray(data[i]).tolist() for i in range(len(data))]


def expected_tokens(texts: list[str]) -> list[list[int]]:
    tokenizer = build_tokenizer("bytes")
    return [tokenizer.tokenize(text) + [tokenizer.eod] for text in texts]


def test_a_dataset_pulled_from_the_hub_matches_what_was_pushed(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # not served locally

    folder = tmp_path / "pushed" / "data"
    folder.mkdir(parents=True)
    table = pa.table({"text": TEXTS, "id": list(range(len(TEXTS)))})
    pq.write_table(table, folder / "train-00000-of-00001.parquet")
    with HubServer() as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("org/corpus", repo_type="dataset")
        api.upload_folder(repo_id="org/corpus", repo_type="dataset", folder_path=folder.parent)
        out = tmp_path / "out" / "corpus"
        argv = ["--hf-dataset", "org/corpus", "--output-prefix", str(out)]
        argv += ["--tokenizer-type", "bytes", "--append-eod"]
        counted = prepare(tmp_path, *argv, "--count-only", endpoint=hub.endpoint)
        assert counted.returncode == 0, counted.stderr
        assert not out.parent.exists()  # --count-only writes nothing
        result = prepare(tmp_path, *argv, endpoint=hub.endpoint)
    assert result.returncode == 0, result.stderr
    exported = [json.loads(line)["text"] for line in Path(f"{out}_export.jsonl").open()]
    assert exported == TEXTS
    assert documents(Path(f"{out}_text_document")) == expected_tokens(TEXTS)
    results = json.loads((out.parent / "pipeline_results.json").read_text())
    tokens = sum(map(len, expected_tokens(TEXTS)))
    assert (results["documents"], results["tokens"]) == (len(TEXTS), tokens)
    assert results["outputs"] == [f"{out}_text_document"]
    assert results["source"] == "org/corpus" and results["kind"] == "text"
    assert results["tokenizer"] == {"--tokenizer-type": "bytes"} and results["seconds"] > 0
    assert json.loads(counted.stdout)["tokens"] == tokens


def test_local_folder_skip_tokenize_then_skip_export(tmp_path):
    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(str(tmp_path / "disk"))
    out = tmp_path / "out" / "local"
    argv = ["--local", str(tmp_path / "disk"), "--output-prefix", str(out), "--text-key", "body"]
    first = prepare(tmp_path, *argv, "--skip-tokenize")
    assert first.returncode == 0, first.stderr
    assert not Path(f"{out}_text_document.bin").exists()
    second = prepare(tmp_path, *argv, "--skip-export", "--tokenizer-type", "bytes", "--append-eod")
    assert second.returncode == 0, second.stderr
    assert documents(Path(f"{out}_text_document")) == expected_tokens(TEXTS)


def test_conversations_use_the_chat_template(tmp_path, smollm2_hf):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
    datasets.Dataset.from_dict({"conversations": [turns]}).save_to_disk(str(tmp_path / "chat"))
    out = tmp_path / "out" / "chat"
    argv = ["--local", str(tmp_path / "chat"), "--output-prefix", str(out)]
    missing = prepare(tmp_path, *argv, "--tokenizer-type", "bytes")
    assert missing.returncode == 1 and "pass --tokenizer-path" in missing.stderr
    result = prepare(tmp_path, *argv, "--tokenizer-path", str(smollm2_hf))
    assert result.returncode == 0, result.stderr
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    encoded = AutoTokenizer.from_pretrained(smollm2_hf).apply_chat_template(messages)
    ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    assert documents(Path(f"{out}_messages_document")) == [ids]
    assert Path(f"{out}_messages_label_document.bin").is_file()


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("key", "has no column 'content' (columns: text, id); name the text column"),
        ("split", "no split 'test' (splits: train); pass --split"),
        ("repo", "--hf-dataset 'no slash': expected a repo id namespace/name"),
        ("skip", "--skip-export: "),
    ],
)
def test_bad_input(tmp_path, problem, expected):
    data = {"text": TEXTS, "id": [0, 1, 2]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data)}).save_to_disk(
        str(tmp_path / "dict")
    )
    out = str(tmp_path / "out" / "x")
    argv = ["--local", str(tmp_path / "dict"), "--output-prefix", out, "--tokenizer-type", "bytes"]
    if problem == "key":
        argv += ["--text-key", "content"]
    elif problem == "split":
        argv += ["--split", "test"]
    elif problem == "repo":
        argv[:2] = ["--hf-dataset", "no slash"]
    else:
        argv += ["--skip-export"]
    result = prepare(tmp_path, *argv)
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
