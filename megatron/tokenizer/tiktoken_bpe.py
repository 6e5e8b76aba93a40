"""A tiktoken `.tiktoken` ranks file read from disk (NeoX's TiktokenTokenizer, without a download).

NeoX passes an encoding name to `tiktoken.get_encoding`, which fetches the ranks over the network.
Here `vocab_file` is the ranks file itself; the split pattern and special tokens of its encoding
are chosen by the file name (`cl100k_base.tiktoken`) or, failing that, by its number of ranks.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import NamedTuple

import tiktoken

from megatron.tokenizer.base import Tokenizer, require_file
from megatron.tokenizer.registry import register_tokenizer

ENDOFTEXT = "<|endoftext|>"

# Pre-tokenization regexes of OpenAI's encodings (facts of the formats, as tiktoken defines them).
R50K_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


class EncodingSpec(NamedTuple):
    pattern: str
    special_tokens: dict[str, int]
    num_ranks: int  # mergeable ranks in the file, to recognise a renamed file


ENCODINGS: dict[str, EncodingSpec] = {
    "r50k_base": EncodingSpec(R50K_PATTERN, {ENDOFTEXT: 50256}, 50256),
    "p50k_base": EncodingSpec(R50K_PATTERN, {ENDOFTEXT: 50256}, 50280),
    "cl100k_base": EncodingSpec(
        CL100K_PATTERN,
        {
            ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        100256,
    ),
}


def read_ranks(path: str) -> dict[bytes, int]:
    """The `base64-token rank` lines of a `.tiktoken` file.

    tiktoken's own loader is not used: it caches every file it reads under the temporary folder,
    keyed by path, and serves that copy even after the file changes.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as err:
                raise ValueError(
                    f"vocab_file {path} line {number} is not a tiktoken rank "
                    f"('<base64 token> <rank>'): {line[:60]!r}"
                ) from err
    if not ranks:
        raise ValueError(f"vocab_file {path} holds no tiktoken ranks")
    return ranks


def encoding_for(path: str, ranks: dict[bytes, int]) -> tuple[str, EncodingSpec]:
    """The encoding a ranks file belongs to: by file name, else by its number of ranks."""
    stem = os.path.basename(path).split(".")[0]
    if stem in ENCODINGS:
        return stem, ENCODINGS[stem]
    for name, spec in ENCODINGS.items():
        if spec.num_ranks == len(ranks):
            return name, spec
    known = ", ".join(f"{n}.tiktoken ({s.num_ranks} ranks)" for n, s in ENCODINGS.items())
    raise ValueError(
        f"vocab_file {path}: cannot tell which tiktoken encoding its {len(ranks)} ranks belong "
        f"to; expected one of {known}"
    )


@register_tokenizer("TiktokenTokenizer")
class TiktokenTokenizer(Tokenizer):
    """Special-token text (`<|endoftext|>`) encodes to its id, as NeoX's batch encoding does.

    `vocab_file` is the `.tiktoken` file; `merge_file` is ignored. tiktoken has no padding token,
    so padding uses the end-of-document id.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merge_file: str | os.PathLike[str] | None = None,
    ) -> None:
        path = require_file("vocab_file", vocab_file, self.name)
        ranks = read_ranks(path)
        encoding, spec = encoding_for(path, ranks)
        try:
            self._enc = tiktoken.Encoding(
                encoding,
                pat_str=spec.pattern,
                mergeable_ranks=ranks,
                special_tokens=spec.special_tokens,
            )
        except ValueError as err:
            raise ValueError(f"vocab_file {path} is not a valid {encoding} file: {err}") from err
        self.encoding = encoding
        self.vocab_size = self._enc.n_vocab
        self.eod = self._enc.eot_token
        self.pad = self.eod

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def detokenize(self, token_ids: list[int]) -> str:
        ids = [int(i) for i in token_ids]
        try:
            return self._enc.decode(ids, errors="replace")
        except (KeyError, ValueError, OverflowError) as err:
            raise ValueError(
                f"cannot decode token ids with {self.encoding} "
                f"(ids 0..{self.vocab_size - 1}, some unused): {err}"
            ) from err
