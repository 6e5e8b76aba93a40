"""A Hugging Face tokenizer's chat template, for prompting chat models (generate.py's
`apply_chat_template`, eval.py's `eval_apply_chat_template`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.neox_arguments import ConfigError


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template: its Jinja `source` and `render(messages)`."""

    source: str
    tokenizer: Any

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def load_chat_template(key: str, tokenizer_type: str, vocab_file: str | None) -> ChatTemplate:
    """The chat template of the Hugging Face tokenizer in the folder of `vocab_file`
    (tokenizer_config.json's chat_template or chat_template.jinja). `key` names the setting
    that asked for it in errors."""
    if tokenizer_type != "HFTokenizer" or not vocab_file:
        raise ConfigError(
            f"{key}: chat templates come with a Hugging Face tokenizer (tokenizer_type: "
            f"HFTokenizer and vocab_file: its tokenizer.json), not {tokenizer_type}"
        )
    folder = Path(vocab_file).parent
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: cannot load the tokenizer in {folder}: {err}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{key}: the tokenizer in {folder} has no chat template (expected chat_template in "
            "tokenizer_config.json or a chat_template.jinja)"
        )

    return ChatTemplate(tokenizer.chat_template, tokenizer)
