"""A Hugging Face tokenizer's chat template, for prompting chat models (generate.py's
`apply_chat_template`, eval.py's `eval_apply_chat_template`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron.neox_arguments import ConfigError

ChatTemplate = Callable[[list[dict[str, str]], bool], str]


def load_chat_template(key: str, tokenizer_type: str, vocab_file: str | None) -> ChatTemplate:
    """render(messages, add_generation_prompt) -> text, from the folder of `vocab_file`
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

    def render(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render
