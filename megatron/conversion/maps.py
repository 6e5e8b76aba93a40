"""The declared name-and-layout map of each Hugging Face architecture, used in both directions.

A rule pairs one Strata parameter (a name template over layer `{i}` and `{p}` = weight/bias)
with the Hugging Face tensors it is made of and the layout that converts between them.
Strata's names are those of `GPTModel(config).named_parameters()` at tensor-parallel size 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megatron.conversion import hf_config
from megatron.conversion.hf_config import ConversionError
from megatron.conversion.layouts import (
    GATE_UP,
    GROUPED_QKV,
    IDENTITY,
    VOCAB_ROWS,
    Dims,
    Layout,
)
from megatron.registry import Registry


@dataclass(frozen=True)
class TensorRule:
    strata: str
    hf: tuple[str, ...]
    layout: Layout = IDENTITY

    def match(self, name: str) -> dict[str, str] | None:
        pattern = re.escape(self.strata).replace(r"\{i\}", r"(?P<i>\d+)")
        pattern = pattern.replace(r"\{p\}", r"(?P<p>weight|bias)")
        found = re.fullmatch(pattern, name)
        return None if found is None else found.groupdict()

    def hf_names(self, fields: dict[str, str]) -> list[str]:
        return [template.format(**fields) for template in self.hf]


@dataclass(frozen=True)
class Architecture:
    name: str  # the --architecture choice and Hugging Face model_type
    hf_class: str  # the `architectures` entry of config.json
    config_class: str  # the transformers config class
    rules: tuple[TensorRule, ...]
    to_neox: Callable[[Any, str], dict[str, Any]]  # HF config -> NeoX keys
    to_hf: Callable[[Any, int], dict[str, Any]]  # ModelConfig, vocab -> HF config kwargs
    # Hugging Face tensors that are not parameters (buffers some checkpoints include).
    ignored: tuple[str, ...] = (r".*\.rotary_emb\.inv_freq",)

    def rule_for(self, strata_name: str) -> tuple[TensorRule, dict[str, str]]:
        for rule in self.rules:
            fields = rule.match(strata_name)
            if fields is not None:
                return rule, fields
        raise ConversionError(
            f"{self.name}: Strata parameter {strata_name} has no Hugging Face counterpart "
            "(the configured model uses a feature this architecture lacks)"
        )

    def to_strata(
        self,
        hf_tensors: Mapping[str, torch.Tensor],
        expected: Mapping[str, torch.Size],
        dims: Dims,
        source: str,
        tied: bool,
    ) -> dict[str, torch.Tensor]:
        """Strata tensors for every expected parameter; missing, unused or misshapen Hugging
        Face tensors are one error listing them all."""
        out, used, problems = {}, set(), []
        for name, shape in expected.items():
            rule, fields = self.rule_for(name)
            names = rule.hf_names(fields)
            absent = [n for n in names if n not in hf_tensors]
            if absent:
                problems.append(f"  {', '.join(absent)}: missing (needed for {name})")
                continue
            used.update(names)
            try:
                tensor = rule.layout.to_strata([hf_tensors[n] for n in names], dims)
            except (RuntimeError, ValueError) as err:
                problems.append(f"  {', '.join(names)}: wrong shape for {name} ({err})")
                continue
            if tuple(tensor.shape) != tuple(shape):
                problems.append(
                    f"  {', '.join(names)}: gives {list(tensor.shape)} for {name}, the config "
                    f"expects {list(shape)}"
                )
            out[name] = tensor
        head = self.tied_head_name()
        ignored = [re.compile(p) for p in self.ignored]
        unused = sorted(
            n
            for n in hf_tensors
            if n not in used
            and not any(p.fullmatch(n) for p in ignored)
            and not (tied and n == head)  # some checkpoints store the tied head twice
        )
        problems += [f"  {n}: not part of a {self.hf_class}" for n in unused]
        if problems:
            raise ConversionError(f"{source} does not fit {self.hf_class}:\n" + "\n".join(problems))
        return out

    def to_hf_tensors(
        self,
        tensors: Mapping[str, torch.Tensor],
        expected: Mapping[str, torch.Size],
        dims: Dims,
        source: str,
    ) -> dict[str, torch.Tensor]:
        """Hugging Face tensors from a Strata checkpoint checked against the config's model.
        Vocabulary rows may be padded to any size; all other shapes must match exactly."""
        problems = [
            f"  {n}: in the checkpoint but not in the model" for n in tensors if n not in expected
        ]
        out: dict[str, torch.Tensor] = {}
        for name, shape in expected.items():
            rule, fields = self.rule_for(name)
            tensor = tensors.get(name)
            if tensor is None:
                problems.append(
                    f"  {name}: missing from the checkpoint (config expects {list(shape)})"
                )
                continue
            got = list(tensor.shape)
            if rule.layout is VOCAB_ROWS and got[1:] == list(shape[1:]) and got[0] < dims.hf_vocab:
                problems.append(
                    f"  {name}: {got[0]} vocabulary rows, fewer than the tokenizer's "
                    f"{dims.hf_vocab} tokens (the tokenizer's vocabulary exceeds the model's)"
                )
                continue
            if got != list(shape) and not (
                rule.layout is VOCAB_ROWS and got[1:] == list(shape[1:])
            ):
                problems.append(f"  {name}: checkpoint has {got}, the config expects {list(shape)}")
                continue
            parts = rule.layout.to_hf(tensor, dims)
            out.update(zip(rule.hf_names(fields), (p.contiguous() for p in parts)))
        if problems:
            raise ConversionError(
                f"{source} does not match the configured model:\n" + "\n".join(problems)
            )
        return out

    def tied_head_name(self) -> str:
        rule, fields = self.rule_for("lm_head.weight")
        return rule.hf_names(fields)[0]


ARCHITECTURES: Registry[Architecture] = Registry(
    "architecture", register_with="megatron.conversion.register_architecture"
)


def register_architecture(arch: Architecture) -> None:
    ARCHITECTURES.register(arch.name, arch)


def architecture_for_hf_class(hf_class: str, source: str) -> Architecture:
    for _, arch in ARCHITECTURES.items():
        if arch.hf_class == hf_class:
            return arch
    supported = ", ".join(sorted(a.hf_class for _, a in ARCHITECTURES.items()))
    raise ConversionError(
        f"{source}: architecture {hf_class!r} is not supported; supported: {supported}"
    )


def _layer(template: str) -> str:
    return "layers.{i}." + template


_NEOX = "gpt_neox.layers.{i}."
register_architecture(
    Architecture(
        name="gpt_neox",
        hf_class="GPTNeoXForCausalLM",
        config_class="GPTNeoXConfig",
        rules=(
            TensorRule(
                "embedding.word_embeddings.weight", ("gpt_neox.embed_in.weight",), VOCAB_ROWS
            ),
            TensorRule(_layer("input_layernorm.{p}"), (_NEOX + "input_layernorm.{p}",)),
            TensorRule(
                _layer("post_attention_layernorm.{p}"), (_NEOX + "post_attention_layernorm.{p}",)
            ),
            # Both use per-head [heads, 3, head_dim] rows: the same tensor.
            TensorRule(
                _layer("attention.query_key_value.{p}"), (_NEOX + "attention.query_key_value.{p}",)
            ),
            TensorRule(_layer("attention.dense.{p}"), (_NEOX + "attention.dense.{p}",)),
            TensorRule(_layer("mlp.dense_h_to_4h.{p}"), (_NEOX + "mlp.dense_h_to_4h.{p}",)),
            TensorRule(_layer("mlp.dense_4h_to_h.{p}"), (_NEOX + "mlp.dense_4h_to_h.{p}",)),
            TensorRule("final_norm.norm.{p}", ("gpt_neox.final_layer_norm.{p}",)),
            TensorRule("lm_head.weight", ("embed_out.weight",), VOCAB_ROWS),
        ),
        to_neox=hf_config.gpt_neox_to_neox,
        to_hf=hf_config.neox_to_gpt_neox,
        # Old GPT-NeoX checkpoints also hold the causal-mask buffers.
        ignored=(r".*\.rotary_emb\.inv_freq", r".*\.attention\.(masked_)?bias"),
    )
)

_LLAMA = "model.layers.{i}."
_LLAMA_RULES = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB_ROWS),
    TensorRule(_layer("input_layernorm.weight"), (_LLAMA + "input_layernorm.weight",)),
    TensorRule(
        _layer("post_attention_layernorm.weight"), (_LLAMA + "post_attention_layernorm.weight",)
    ),
    # Hugging Face Llama q/k rows are already in rotate-half order: only the grouping changes.
    TensorRule(
        _layer("attention.query_key_value.{p}"),
        tuple(_LLAMA + f"self_attn.{x}_proj.{{p}}" for x in "qkv"),
        GROUPED_QKV,
    ),
    TensorRule(_layer("attention.dense.{p}"), (_LLAMA + "self_attn.o_proj.{p}",)),
    TensorRule(
        _layer("mlp.dense_h_to_4h.{p}"),
        (_LLAMA + "mlp.gate_proj.{p}", _LLAMA + "mlp.up_proj.{p}"),
        GATE_UP,
    ),
    TensorRule(_layer("mlp.dense_4h_to_h.{p}"), (_LLAMA + "mlp.down_proj.{p}",)),
    TensorRule("final_norm.norm.weight", ("model.norm.weight",)),
    TensorRule("lm_head.weight", ("lm_head.weight",), VOCAB_ROWS),
)
register_architecture(
    Architecture(
        name="llama",
        hf_class="LlamaForCausalLM",
        config_class="LlamaConfig",
        rules=_LLAMA_RULES,
        to_neox=hf_config.llama_to_neox,
        to_hf=hf_config.neox_to_llama,
    )
)
register_architecture(
    Architecture(
        name="mistral",
        hf_class="MistralForCausalLM",
        config_class="MistralConfig",
        rules=_LLAMA_RULES,
        to_neox=hf_config.mistral_to_neox,
        to_hf=hf_config.neox_to_mistral,
    )
)


def auto_architecture(model: Any) -> Architecture:
    """The Hugging Face architecture a ModelConfig describes."""
    if model.norm == "rmsnorm" and model.activation == "swiglu":
        name = "mistral" if model.sliding_window_width else "llama"
        return ARCHITECTURES[name]
    return ARCHITECTURES["gpt_neox"]
