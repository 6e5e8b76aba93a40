"""torch.compile applied to a built model, block by block (the ``torch_compile`` key).

Each transformer block is compiled in place (``nn.Module.compile``): parameter names, state dicts
and checkpoints stay the same, and activation checkpointing still wraps whole blocks. Every block
has the same code and shapes, so one compiled graph serves all of them.
"""

from __future__ import annotations

from torch import nn

from megatron.model.transformer import TransformerLayer


def compile_transformer_blocks(model: nn.Module) -> int:
    """Compile every TransformerLayer in ``model``; returns how many were compiled."""
    blocks = [module for module in model.modules() if isinstance(module, TransformerLayer)]
    for block in blocks:
        block.compile()
    return len(blocks)
