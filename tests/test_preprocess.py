"""preprocess_data, train_tokenizer and stdlib_corpus, run in-process through their main()."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import REPO
from tokenizers import Tokenizer as HFBackend
from tokenizers import models, pre_tokenizers

from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron.tokenizer import build_tokenizer
from tools import train_tokenizer
from tools.datasets import preprocess_data, readers, stdlib_corpus, worker_pool

pytestmark = pytest.mark.timeout(180)

EOD = 256  # the bytes tokenizer's end of document


@pytest.fixture
def brown(assets: Path, tmp_path: Path) -> Path:
    """The first 40 Brown documents: real text, small enough to stay fast."""
    path = tmp_path / "in" / "brown.jsonl"
    path.parent.mkdir()
    with open(assets / "corpora/brown.jsonl", "rb") as src:
        path.write_bytes(b"".join(islice(src, 40)))
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    """`records` as .jsonl, .jsonl.gz, .jsonl.zst or .parquet, chosen by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        columns = {key: [r[key] for r in records] for key in records[0]}
        pq.write_table(pa.table(columns), path, row_group_size=2)
        return path
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_bytes(inputs: str | list[str], prefix: Path, *extra: str) -> int:
    argv = ["--output-prefix", str(prefix), "--tokenizer-type", "bytes"]
    for spec in [inputs] if isinstance(inputs, str) else inputs:
        argv += ["--input", spec]
    return preprocess_data.main([*argv, *extra])


def documents(prefix: Path) -> list[list[int]]:
    return [doc.tolist() for doc in MMapIndexedDataset(prefix)[:]]


def as_bytes_ids(*texts: str) -> list[list[int]]:
    """What the bytes tokenizer with --append-eod writes for `texts` (empty ones are skipped)."""
    return [list(t.encode()) + [EOD] for t in texts if t]


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny batches, so a few records cross several batch (and parquet row-batch) edges."""
    monkeypatch.setattr(preprocess_data, "BATCH_RECORDS", 2)
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 2)


@pytest.mark.parametrize("workers", [1, 2])
def test_gpt2_ids_per_document(assets: Path, brown: Path, tmp_path: Path, workers: int) -> None:
    vocab, merges = assets / "tokenizers/gpt2-vocab.json", assets / "tokenizers/gpt2-merges.txt"
    prefix = tmp_path / "out" / "brown"
    argv = ["--input", str(brown), "--output-prefix", str(prefix)]
    argv += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab)]
    argv += ["--merge-file", str(merges), "--append-eod", "--workers", str(workers)]
    assert preprocess_data.main(argv) == 0

    tok = build_tokenizer("GPT2BPETokenizer", vocab, merges)
    texts = [json.loads(line)["text"] for line in brown.read_text().splitlines()]
    ds = MMapIndexedDataset(f"{prefix}_text_document")
    assert ds.dtype == np.uint16
    assert len(ds) == len(texts) == 40
    assert ds.doc_idx.tolist() == list(range(41))
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]
    assert sorted(os.listdir(prefix.parent)) == [
        "brown_text_document.bin",
        "brown_text_document.idx",
    ]


TEXTS = ["hello", "wörld 🙂\n\tsecond line", "", "x" * 3000, "the end"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_round_trip_per_format(
    tmp_path: Path, capsys: pytest.CaptureFixture, small_batches: None, suffix: str
) -> None:
    path = write_records(tmp_path / "in" / f"docs{suffix}", [{"text": t} for t in TEXTS])
    prefix = tmp_path / "out" / "ds"
    assert run_bytes(str(path), prefix, "--append-eod") == 0

    assert documents(tmp_path / "out" / "ds_text_document") == as_bytes_ids(*TEXTS)
    assert sorted(os.listdir(prefix.parent)) == ["ds_text_document.bin", "ds_text_document.idx"]
    report = capsys.readouterr().out
    tokens = sum(len(t.encode()) + 1 for t in TEXTS if t)
    assert re.search(r"read 5 records \([\d,]+ bytes\) from 1 file in [\d.]+ s", report)
    assert f"text: 4 documents, {tokens:,} tokens (uint16), {2 * tokens:,} bytes" in report
    assert "(1 empty documents skipped)" in report


def test_txt_files_are_one_document_each(tmp_path: Path) -> None:
    texts = {"b.txt": "", "c.txt": "third ü\n", "a.txt": "first\nstill the first\n"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    assert run_bytes(str(tmp_path / "*.txt"), tmp_path / "out" / "ds", "--append-eod") == 0
    expected = as_bytes_ids(texts["a.txt"], texts["b.txt"], texts["c.txt"])  # sorted by name
    assert documents(tmp_path / "out" / "ds_text_document") == expected


@pytest.mark.parametrize("workers", ["1", "2"])
def test_globs_and_repeated_inputs_keep_their_order(
    tmp_path: Path, small_batches: None, workers: str
) -> None:
    folder = tmp_path / "in"
    shards = {
        "shard-2.jsonl.zst": ["s2a", "s2b"],
        "shard-1.jsonl.gz": ["s1"],
        "shard-10.jsonl": ["s10a", "s10b", "s10c"],
    }
    for name, texts in shards.items():
        write_records(folder / name, [{"text": t} for t in texts])
    write_records(folder / "extra.parquet", [{"text": "p1"}, {"text": "p2"}, {"text": "p3"}])
    (folder / "notes.txt").write_text("txt")
    inputs = [f"{folder}/shard-*.jsonl*", f"{folder / 'extra.parquet'},{folder / 'notes.txt'}"]
    prefix = tmp_path / f"out{workers}"
    assert run_bytes(inputs, prefix, "--append-eod", "--workers", workers) == 0
    # Each glob's matches in sorted (not numeric) order, then the other files as given.
    order = ["s1", "s10a", "s10b", "s10c", "s2a", "s2b", "p1", "p2", "p3", "txt"]
    assert documents(Path(f"{prefix}_text_document")) == as_bytes_ids(*order)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".parquet"])
def test_one_dataset_per_key(tmp_path: Path, capsys: pytest.CaptureFixture, suffix: str) -> None:
    records = [
        {"text": "ab", "title": "T1"},
        {"text": "", "title": "T2"},
        {"text": "cde", "title": ""},
    ]
    path = write_records(tmp_path / f"in{suffix}", records)
    assert (
        run_bytes(str(path), tmp_path / "out", "--jsonl-keys", "text", "title", "--append-eod") == 0
    )

    assert documents(tmp_path / "out_text_document") == [[97, 98, EOD], [99, 100, 101, EOD]]
    assert documents(tmp_path / "out_title_document") == [[84, 49, EOD], [84, 50, EOD]]
    report = capsys.readouterr().out
    assert "read 3 records" in report
    assert "text: 2 documents, 7 tokens" in report and "title: 2 documents, 6 tokens" in report


def test_blank_lines_are_not_documents(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('\n{"text": "a"}\n  \n\n{"text": "b"}\n')
    assert run_bytes(str(path), tmp_path / "out") == 0
    assert documents(tmp_path / "out_text_document") == [[97], [98]]


def test_ftfy_repairs_mojibake(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "schÃ¶n"}])
    assert run_bytes(str(path), tmp_path / "raw") == 0
    assert run_bytes(str(path), tmp_path / "fixed", "--ftfy") == 0
    assert documents(tmp_path / "raw_text_document") == [list("schÃ¶n".encode())]
    assert documents(tmp_path / "fixed_text_document") == [list("schön".encode())]


def test_workers_give_identical_files(tmp_path: Path, small_batches: None) -> None:
    records = [{"text": f"document {i} " * (i % 7 + 1)} for i in range(300)]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    assert run_bytes(str(path), tmp_path / "one", "--workers", "1") == 0
    assert run_bytes(str(path), tmp_path / "two", "--workers", "2") == 0
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"one_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"two_text_document{suffix}").read_bytes()


def word_level_tokenizer(path: Path, vocab_size: int) -> Path:
    """A tokenizer.json whose vocabulary is `w0 w1 ...` plus `<|endoftext|>` as the last id."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<|endoftext|>": vocab_size - 1}
    backend = HFBackend(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(path))
    return path


@pytest.mark.parametrize(("vocab_size", "dtype"), [(65499, np.uint16), (65500, np.int32)])
def test_dtype_follows_neox_rule(tmp_path: Path, vocab_size: int, dtype: type) -> None:
    tokenizer = word_level_tokenizer(tmp_path / "tokenizer.json", vocab_size)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": f"w0 w{vocab_size - 2}"}])
    argv = ["--input", str(path), "--output-prefix", str(tmp_path / "ds"), "--append-eod"]
    argv += ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(tokenizer)]
    assert preprocess_data.main(argv) == 0
    ds = MMapIndexedDataset(tmp_path / "ds_text_document")
    assert ds.dtype == dtype
    assert ds[0].tolist() == [0, vocab_size - 2, vocab_size - 1]


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


GOOD = b'{"text": "fine"}\n'
# id: (input file name, its content, extra flags, fragments the error must hold). Content is
# bytes, a pyarrow table (written as parquet), "dir" (a folder) or None (nothing is created).
BAD_INPUTS = {
    "invalid JSON": ("a.jsonl", GOOD + b"{not json\n", [], ["{path}:2", "not valid JSON"]),
    "invalid JSON, in a worker": (
        "a.jsonl",
        GOOD * 3 + b"{not json\n",
        ["--workers", "2"],
        ["{path}:4", "not valid JSON"],
    ),
    "not an object": ("a.jsonl", GOOD + b"[1]\n", [], ["{path}:2", "expected a JSON object"]),
    "missing key": ("a.jsonl", GOOD + b'{"body": "x"}\n', [], ["{path}:2", "missing key 'text'"]),
    "missing key, skipping bad lines": (
        "a.jsonl",
        b'{"body": "x"}\n',
        ["--skip-bad-lines"],
        ["{path}:1", "missing key 'text'"],
    ),
    "not a string": ("a.jsonl", GOOD + b'{"text": 3}\n', [], ["{path}:2", "must be a string"]),
    "invalid UTF-8": (
        "a.jsonl",
        GOOD + b'{"text": "caf\xe9"}\n',
        [],
        ["{path}:2", "invalid UTF-8 at byte 13"],
    ),
    "surrogate escape": (
        "a.jsonl",
        GOOD + b'{"text": "a\\ud800"}\n',
        [],
        ["{path}:2", "unpaired surrogate"],
    ),
    "bad line in zst": (
        "a.jsonl.zst",
        _zst(GOOD * 2 + b"{x\n"),
        [],
        ["{path}:3", "not valid JSON"],
    ),
    "truncated zst": (
        "a.jsonl.zst",
        _zst(GOOD * 50)[:-4],
        [],
        ["{path}: cannot read", "truncated"],
    ),
    "corrupt gzip": ("a.jsonl.gz", b"not gzip data", [], ["{path}: cannot read", "gzip"]),
    "truncated gzip": ("a.jsonl.gz", gzip.compress(GOOD * 50)[:-8], [], ["{path}: cannot read"]),
    "txt invalid UTF-8": ("a.txt", b"ok\nbad \xff\n", [], ["{path}: invalid UTF-8", "line 2"]),
    "txt with two keys": (
        "a.txt",
        b"ok",
        ["--jsonl-keys", "text", "title"],
        ["{path}: a .txt file is one document"],
    ),
    "parquet null": (
        "a.parquet",
        pa.table({"text": ["a", "b", None]}),
        [],
        ["{path}: row 3", "column 'text' is null"],
    ),
    "parquet invalid UTF-8": (
        "a.parquet",
        pa.table({"text": pa.array([b"ok", b"ok", b"\xffbad"], pa.binary())}),
        [],
        ["{path}: row 3", "column 'text'", "invalid UTF-8"],
    ),
    "parquet missing column": (
        "a.parquet",
        pa.table({"body": ["a"]}),
        [],
        ["{path}: missing column 'text'", "['body']"],
    ),
    "parquet column type": (
        "a.parquet",
        pa.table({"text": [1, 2]}),
        [],
        ["{path}: column 'text' has type int64"],
    ),
    "not parquet": ("a.parquet", b"PAR1 not really", [], ["{path}: not a readable parquet"]),
    "missing file": ("a.jsonl", None, [], ["{path}: input file not found"]),
    "directory": ("a.jsonl", "dir", [], ["{path}: is a directory"]),
    "unsupported suffix": ("a.csv", b"text\nx\n", [], ["{path}: unsupported input", ".jsonl.zst"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, small_batches: None, case: str
) -> None:
    name, content, extra, fragments = BAD_INPUTS[case]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    assert run_bytes(str(path), out / "ds", *extra) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("error: ")
    for fragment in fragments:
        assert fragment.format(path=path) in error
    assert os.listdir(out) == []


def test_input_lists_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    assert run_bytes(str(tmp_path / "nothing-*.jsonl"), tmp_path / "ds") == 1
    assert "pattern" in (err := capsys.readouterr().err) and "matches no files" in err
    assert run_bytes([str(path), f"{tmp_path}/*.jsonl"], tmp_path / "ds") == 1
    assert f"{path}: named twice by --input" in capsys.readouterr().err
    assert run_bytes(",", tmp_path / "ds") == 1
    assert "--input names no files" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["a.jsonl"]


def test_skip_bad_lines_counts_by_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lines = [GOOD, b"{broken\n", b'{"text": "caf\xe9"}\n', b"[1]\n", b'{"text": "ok"}\n', b"{x\n"]
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(lines))
    (tmp_path / "b.txt").write_bytes(b"\xff")
    inputs = f"{path},{tmp_path / 'b.txt'}"
    assert run_bytes(inputs, tmp_path / "ds", "--skip-bad-lines") == 0
    assert documents(tmp_path / "ds_text_document") == [list(b"fine"), list(b"ok")]
    report = capsys.readouterr().out
    assert "read 7 records" in report
    assert "skipped bad records: 2 invalid JSON, 2 invalid UTF-8, 1 not a JSON object" in report


def test_tasks_are_bounded_batches_of_one_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preprocess_data, "BATCH_BYTES", 1000)
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": "x" * 80}] * 30)
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": "y" * 80}] * 5)
    tasks = list(preprocess_data.make_tasks([str(first), str(second)], ["text"]))
    line_size = len(first.read_bytes()) // 30
    numbers = [(path, n) for path, records, _ in tasks for n, _ in records]
    assert numbers == [(str(first), n) for n in range(1, 31)] + [
        (str(second), n) for n in range(1, 6)
    ]
    for _, records, size in tasks:
        assert size == len(records) * line_size < 1000 + line_size
    assert [len(records) for _, records, _ in tasks] == [11, 11, 8, 5]  # 94-byte lines


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_hold_a_bounded_number_of_tasks(workers: int) -> None:
    taken = 0

    def tasks():
        nonlocal taken
        for number in range(1, 101):
            taken += 1
            yield "a.jsonl", [(number, b'{"text": "x"}\n')], 14

    options = preprocess_data.EncodeOptions("bytes", None, None, ("text",), False, False, False)
    stream = worker_pool.ordered_map(
        preprocess_data.encode_task, tasks(), workers, preprocess_data.init_encoder, (options,)
    )
    next(stream)
    assert taken <= (1 if workers == 1 else worker_pool.PENDING_PER_WORKER * workers)
    assert len(list(stream)) == 99


def test_failed_finalize_removes_finished_siblings(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the second key's dataset cannot be finalized, the first one (already under its
    final name) is removed too: a key set is written whole or not at all."""
    finalize = MMapIndexedDatasetBuilder.finalize
    calls = []

    def failing_second(self: MMapIndexedDatasetBuilder, idx_path: str) -> None:
        calls.append(idx_path)
        if len(calls) == 2:
            raise OSError(f"No space left on device: {idx_path}")
        finalize(self, idx_path)

    monkeypatch.setattr(MMapIndexedDatasetBuilder, "finalize", failing_second)
    path = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "a", "title": "b"}])
    out = tmp_path / "out"
    assert run_bytes(str(path), out / "ds", "--jsonl-keys", "text", "title") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert len(calls) == 2 and os.listdir(out) == []


def test_ctrl_c_leaves_no_output(tmp_path: Path) -> None:
    """SIGINT while the tool waits for input (a FIFO): exit 130, temporary files removed."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    argv = [sys.executable, "tools/datasets/preprocess_data.py", "--input", str(fifo)]
    argv += ["--output-prefix", str(out / "ds"), "--tokenizer-type", "bytes", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # As from a terminal: a shell's background job (nohup ... &) would start it ignoring SIGINT.
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        with open(fifo, "wb") as writer:  # returns once the tool has opened its input
            writer.write(GOOD * 500)
            writer.flush()
            assert [name for name in os.listdir(out) if name.endswith(".tmp")]
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert b"error: interrupted" in err
    assert os.listdir(out) == []


def test_trained_tokenizer_round_trips(tmp_path: Path) -> None:
    sentences = [
        f"Sentence number {i} talks about {word} and the tokenizer that reads it.\n"
        for i, word in enumerate(["data", "models", "training", "évaluation", "数据"] * 40)
    ]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": s} for s in sentences])
    output = tmp_path / "tok" / "tokenizer.json"
    argv = ["--input", str(corpus), "--vocab-size", "400", "--output", str(output)]
    assert train_tokenizer.main(argv) == 0
    assert sorted(os.listdir(output.parent)) == ["tokenizer.json"]

    tok = build_tokenizer("HFTokenizer", vocab_file=output)
    assert 258 < tok.vocab_size <= 400  # a small corpus may run out of merges before 400
    assert (tok.eod, tok.pad) == (0, 1)
    for text in [sentences[3], "unseen: ünïcödé 🙂\n\ttabs  and  spaces "]:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert len(tok.tokenize(sentences[3])) < len(sentences[3])  # merges were learned


def test_train_tokenizer_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    output = tmp_path / "tokenizer.json"
    assert train_tokenizer.main(["--input", str(corpus), "--output", str(output)]) == 1
    assert f"{corpus}:2" in capsys.readouterr().err
    assert not output.exists()


def test_stdlib_corpus(tmp_path: Path) -> None:
    output = tmp_path / "stdlib.jsonl"
    assert stdlib_corpus.main(["--output", str(output), "--max-bytes", "300000"]) == 0
    data = output.read_bytes()
    assert 0 < len(data) <= 300_000
    texts = [json.loads(line)["text"] for line in data.decode().splitlines()]
    assert len(texts) > 1 and all(t.strip() for t in texts)
    assert any("def " in t for t in texts)
    again = tmp_path / "again.jsonl"
    assert stdlib_corpus.main(["--output", str(again), "--max-bytes", "300000"]) == 0
    assert again.read_bytes() == data  # deterministic order


def test_stdlib_corpus_skips_tests_and_sorts(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    for rel, text in [
        ("b.py", "B = 1\n"),
        ("a/z.py", "Z = 1\n"),
        ("test/t.py", "T = 1\n"),
        ("site-packages/s.py", "S = 1\n"),
        ("empty.py", ""),
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    output = tmp_path / "out.jsonl"
    assert stdlib_corpus.main(["--output", str(output), "--stdlib-dir", str(root)]) == 0
    texts = [json.loads(line)["text"] for line in output.read_text().splitlines()]
    assert texts == ["Z = 1\n", "B = 1\n"]
