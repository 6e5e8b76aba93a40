"""The quickstart corpus: this interpreter's standard-library Python source, as jsonl.

    python tools/datasets/stdlib_corpus.py --output data/stdlib.jsonl --max-bytes 20000000

One `{"text": source}` line per `.py` file, in sorted path order, until --max-bytes; tests,
site-packages and the GUI packages are left out. Needs no download.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tokenize
import uuid
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MAX_BYTES = 20_000_000
SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests"}
    | {"idlelib", "tkinter", "turtledemo"}  # GUI code
)


def source_files(root: Path) -> list[Path]:
    """Every `.py` file under `root` outside SKIPPED_DIRS, sorted by relative path."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]
        found += [Path(directory, f) for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def documents(root: Path) -> Iterator[str]:
    """The non-empty sources, decoded by their own coding declaration."""
    for path in source_files(root):
        try:
            with tokenize.open(path) as f:
                text = f.read()
        except (SyntaxError, UnicodeDecodeError):
            continue  # not decodable as its declared encoding: not useful text
        if text.strip():
            yield text


def write_corpus(root: Path, output: str, max_bytes: int) -> tuple[int, int]:
    """Write the corpus (temporary name, then rename); returns (documents, bytes)."""
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(output)}.{uuid.uuid4().hex[:12]}.tmp")
    count = written = 0
    try:
        with open(tmp, "wb") as f:
            for text in documents(root):
                line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
                if written + len(line) > max_bytes:
                    break
                f.write(line)
                count += 1
                written += len(line)
        if count == 0:
            raise ValueError(f"no source under {root} fits in {max_bytes} bytes")
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count, written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="the jsonl file to write")
    parser.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="stop before this size"
    )
    parser.add_argument(
        "--stdlib-dir",
        default=sysconfig.get_paths()["stdlib"],
        help="source tree to read (default: this interpreter's standard library)",
    )
    args = parser.parse_args(argv)
    root = Path(args.stdlib_dir)
    if not root.is_dir():
        print(f"error: --stdlib-dir {root} is not a directory", file=sys.stderr)
        return 1
    count, written = write_corpus(root, args.output, args.max_bytes)
    if count == 0:
        print(
            f"error: no source under {root} fits in --max-bytes {args.max_bytes}", file=sys.stderr
        )
        return 1
    print(f"wrote {args.output}: {count} documents, {written} bytes from {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
