"""Input formats for preprocess_data.py: a registry from file suffix to reader.

A reader streams the records of one file as `(number, payload)` pairs in the main process;
`parse` turns a payload into the text under each key, in the worker processes, so decoding and
JSON parsing run in parallel. Payloads are bytes (or tuples of bytes) so their size is known
and they pickle cheaply.

    .jsonl / .jsonl.gz / .jsonl.zst   one JSON object per line; `number` is the line
    .txt                              the whole file is one document (as lm_dataformat reads it)
    .parquet                          one document per row, the keys are columns; `number` is
                                      the row (1-based), read in row batches
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import zstandard

from megatron.registry import Registry

# A jsonl line or a .txt file; for parquet, one value per key (None where the row is null).
Payload = bytes | tuple[bytes | None, ...]
PARQUET_BATCH_ROWS = 256  # rows turned into Python values at a time (bounds memory)
GLOB_CHARS = frozenset("*?[")


class PreprocessError(ValueError):
    """Bad input; the message names the file and, where there is one, the line or row."""


class RecordError(ValueError):
    """A record that does not fit the expected schema (a missing key, a non-string value)."""


class BadRecord(RecordError):
    """A record that cannot be decoded at all; `--skip-bad-lines` skips these and counts
    them by `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class InputFormat:
    """How to check, stream and parse one kind of input file."""

    name: str
    unit: str  # what `number` counts in error messages: "line", "row" or "" (whole file)
    # Cheap up-front checks (schema, key count), so a bad file fails before any work is done.
    check: Callable[[str, Sequence[str]], None]
    read: Callable[[str, Sequence[str]], Iterator[tuple[int, Payload]]]
    parse: Callable[[Payload, Sequence[str]], list[str]]

    def size(self, payload: Payload) -> int:
        """Input bytes held by `payload`."""
        if isinstance(payload, bytes):
            return len(payload)
        return sum(len(value) for value in payload if value is not None)


# Suffix -> format; the longest matching suffix wins (".jsonl.gz" before ".gz").
FORMATS: Registry[InputFormat] = Registry("input suffix")


def register_format(suffix: str, input_format: InputFormat) -> None:
    FORMATS.register(suffix, input_format)


def format_of(path: str) -> InputFormat | None:
    matches = [suffix for suffix in FORMATS if path.endswith(suffix)]
    return FORMATS[max(matches, key=len)] if matches else None


def location(path: str, number: int) -> str:
    """`path:12` for a line, `path: row 12` for a row, `path` for a whole-file document."""
    unit = format_of(path).unit
    if unit == "line":
        return f"{path}:{number}"
    return f"{path}: {unit} {number}" if unit else path


def resolve_inputs(specs: Sequence[str], keys: Sequence[str]) -> list[str]:
    """The files named by `--input` values (each comma-separated; globs expanded, sorted) in
    order, checked to exist, be readable and have a known format."""
    paths: list[str] = []
    named_by: dict[str, str] = {}
    for item in (part.strip() for spec in specs for part in spec.split(",")):
        if not item:
            continue
        if GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise PreprocessError(f"--input pattern {item!r} matches no files")
        else:
            matches = [item]
        for path in matches:
            real = os.path.realpath(path)
            if real in named_by:
                raise PreprocessError(
                    f"{path}: named twice by --input ({named_by[real]!r} and {item!r})"
                )
            named_by[real] = item
            paths.append(path)
    if not paths:
        raise PreprocessError("--input names no files")
    for path in paths:
        _check_input(path, keys)
    return paths


def _check_input(path: str, keys: Sequence[str]) -> None:
    input_format = format_of(path)
    if input_format is None:
        raise PreprocessError(
            f"{path}: unsupported input; expected a file ending in {', '.join(FORMATS)}"
        )
    if not os.path.exists(path):
        raise PreprocessError(f"{path}: input file not found")
    if os.path.isdir(path):
        raise PreprocessError(f"{path}: is a directory, expected an input file")
    if not os.access(path, os.R_OK):
        raise PreprocessError(f"{path}: input file is not readable (permission denied)")
    input_format.check(path, keys)


def read_records(path: str, keys: Sequence[str]) -> Iterator[tuple[int, Payload]]:
    """The records of `path`; a read failure (corrupt archive, I/O error) names the file and
    the last record read."""
    input_format = format_of(path)
    number = 0
    try:
        for number, payload in input_format.read(path, keys):
            yield number, payload
    except (OSError, EOFError, zstandard.ZstdError) as err:
        after = f" after {input_format.unit} {number}" if number and input_format.unit else ""
        raise PreprocessError(f"{path}: cannot read{after}: {err}") from None


def parse_record(
    path: str, number: int, payload: Payload, keys: Sequence[str], skip_bad: bool = False
) -> list[str] | BadRecord:
    """The text under each key of one record of `path`. A bad record is a PreprocessError
    naming its location, or with `skip_bad` an undecodable one is returned, to be counted."""
    try:
        return format_of(path).parse(payload, keys)
    except BadRecord as err:
        if skip_bad:
            return err
        raise PreprocessError(f"{location(path, number)}: {err}") from None
    except RecordError as err:
        raise PreprocessError(f"{location(path, number)}: {err}") from None


def iter_texts(paths: Sequence[str], keys: Sequence[str]) -> Iterator[str]:
    """Every text of every record of `paths`, in order (for single-process tools)."""
    for path in paths:
        for number, payload in read_records(path, keys):
            yield from parse_record(path, number, payload, keys)


def _no_check(path: str, keys: Sequence[str]) -> None:
    """Nothing to check before reading: jsonl keys are checked per line."""


# jsonl, plain or compressed.


class ZstdStream(io.RawIOBase):
    """Every frame of a .zst file, decompressed as one stream (files made by concatenating
    .zst files are common). Unlike zstandard's stream_reader, which ends silently, a truncated
    last frame is an error."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame: zstandard.ZstdDecompressionObj | None = None  # the frame being read
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        while not self._pending:
            data = self._file.read(1 << 17)
            if not data:
                if self._frame is not None:
                    raise zstandard.ZstdError("truncated file: the last frame is incomplete")
                return 0
            self._pending = memoryview(self._decompress(data))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            out.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:  # the rest of `data` belongs to the next frame
                data, self._frame = self._frame.unused_data, None
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_jsonl(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(ZstdStream(path), buffer_size=1 << 20)
    return open(path, "rb")


def _read_jsonl(path: str, keys: Sequence[str]) -> Iterator[tuple[int, bytes]]:
    with _open_jsonl(path) as stream:
        for number, line in enumerate(stream, start=1):
            if not line.isspace():  # blank lines are not documents
                yield number, line


def _json_type(value: object) -> str:
    names = {str: "string", int: "number", float: "number", bool: "boolean", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


def _parse_jsonl(line: bytes, keys: Sequence[str]) -> list[str]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(
            "invalid UTF-8",
            f"invalid UTF-8 at byte {err.start} of the line: {line[err.start : err.end]!r}",
        ) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRecord("invalid JSON", f"not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object", f"expected a JSON object, got {_json_type(record)}")
    values = []
    for key in keys:
        if key not in record:
            raise RecordError(f"missing key {key!r} (the record has keys {sorted(record)[:20]})")
        value = record[key]
        if not isinstance(value, str):
            raise RecordError(f"key {key!r} must be a string, got {_json_type(value)}")
        # A \ud800-style escape decodes to a lone surrogate, which no tokenizer can encode.
        if "\\u" in text:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise BadRecord(
                    "invalid UTF-8",
                    f"key {key!r} holds an unpaired surrogate escape at character {err.start}",
                ) from None
        values.append(value)
    return values


# Plain text: one document per file.


def _check_txt(path: str, keys: Sequence[str]) -> None:
    if len(keys) != 1:
        raise PreprocessError(
            f"{path}: a .txt file is one document with no keys; give one --jsonl-keys name "
            f"for its dataset (got {list(keys)})"
        )


def _read_txt(path: str, keys: Sequence[str]) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield 1, f.read()


def _decode_document(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise BadRecord(
            "invalid UTF-8",
            f"invalid UTF-8 at byte {err.start} (line {line}): {data[err.start : err.end]!r}",
        ) from None


def _parse_txt(data: bytes, keys: Sequence[str]) -> list[str]:
    return [_decode_document(data)]


# Parquet: the keys are columns of strings (or UTF-8 binary).


def _check_parquet(path: str, keys: Sequence[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise PreprocessError(f"{path}: not a readable parquet file: {err}") from None
    for key in keys:
        if key not in schema.names:
            raise PreprocessError(
                f"{path}: missing column {key!r} (the file has columns {schema.names[:20]})"
            )
        column_type = schema.field(key).type
        if column_type not in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
            raise PreprocessError(
                f"{path}: column {key!r} has type {column_type}, expected string or binary"
            )


def _read_parquet(path: str, keys: Sequence[str]) -> Iterator[tuple[int, tuple[bytes, ...]]]:
    import pyarrow as pa  # imported on use: only parquet inputs pay for it
    import pyarrow.parquet as pq

    number = 0
    try:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(keys)):
                # As bytes (a cheap cast: the data is shared), so the workers decode (and validate) the UTF-8.
                columns = [batch.column(key).cast(pa.large_binary()).to_pylist() for key in keys]
                for values in zip(*columns):
                    number += 1
                    yield number, values
    except pa.ArrowException as err:  # a corrupt file; read_records adds the row reached
        raise OSError(str(err)) from err


def _parse_parquet(values: tuple[bytes | None, ...], keys: Sequence[str]) -> list[str]:
    texts = []
    for key, value in zip(keys, values):
        if value is None:
            raise RecordError(f"column {key!r} is null, expected a string")
        try:
            texts.append(_decode_document(value))
        except BadRecord as err:
            raise BadRecord(err.reason, f"column {key!r}: {err}") from None
    return texts


_JSONL = InputFormat("jsonl", "line", _no_check, _read_jsonl, _parse_jsonl)
for _suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
    register_format(_suffix, _JSONL)
register_format(".txt", InputFormat("txt", "", _check_txt, _read_txt, _parse_txt))
register_format(
    ".parquet", InputFormat("parquet", "row", _check_parquet, _read_parquet, _parse_parquet)
)
