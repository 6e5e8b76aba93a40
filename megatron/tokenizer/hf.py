"""A Hugging Face `tokenizer.json` (NeoX's HFTokenizer)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer as HFBackend

from megatron.tokenizer.base import Tokenizer, require_file
from megatron.tokenizer.registry import register_tokenizer

# Used when no configuration beside the tokenizer.json names its end-of-sequence token.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
PAD_TOKEN = "<|padding|>"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def configured_eod(folder: str | os.PathLike[str], token_to_id) -> tuple[int, str] | None:
    """(id, where it was found) of the end-of-sequence token the tokenizer's own configuration
    in `folder` names: `eos_token` of tokenizer_config.json (a string or an added-token dict),
    else `eos_token_id` of generation_config.json or config.json (the first of a list). None
    when none names a token that `token_to_id` (str -> id or None) knows."""
    folder = Path(folder)
    eos = _read_json(folder / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and token_to_id(eos) is not None:
        return token_to_id(eos), f"eos_token {eos!r} of {folder / 'tokenizer_config.json'}"
    for name in ("generation_config.json", "config.json"):
        ids = _read_json(folder / name).get("eos_token_id")
        first = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(first, int) and not isinstance(first, bool) and first >= 0:
            return first, f"eos_token_id of {folder / name}"
    return None


@register_tokenizer("HFTokenizer")
class HFTokenizer(Tokenizer):
    """Encodes with the file's own pipeline (normalizer, pre-tokenizer, post-processor)."""

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merge_file: str | os.PathLike[str] | None = None,
    ) -> None:
        path = require_file("vocab_file", vocab_file, self.name)
        try:
            self._backend = HFBackend.from_file(path)
        except Exception as err:  # the Rust side raises a bare Exception
            raise ValueError(f"vocab_file {path} is not a valid tokenizer.json: {err}") from err
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        # The tokenizer's own configuration first (Llama-3's <|end_of_text|>, chat models'
        # end-of-turn tokens), then the names NeoX's tokenizers use.
        configured = configured_eod(Path(path).parent, self._backend.token_to_id)
        if configured is not None and configured[0] < self.vocab_size:
            eod = configured[0]
        else:
            eod = next(
                (i for i in map(self._backend.token_to_id, EOD_CANDIDATES) if i is not None),
                None,
            )
        if eod is None:
            raise ValueError(
                f"vocab_file {path} has no end-of-document token: no eos_token in a "
                f"tokenizer_config.json or generation_config.json beside it, and none of "
                f"{EOD_CANDIDATES}"
            )
        pad = self._backend.token_to_id(PAD_TOKEN)
        self.eod = eod
        self.pad = eod if pad is None else pad

    def tokenize(self, text: str) -> list[int]:
        return self._backend.encode(text).ids

    def detokenize(self, token_ids: list[int]) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=False)
