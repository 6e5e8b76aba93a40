"""Maximal Update Parametrization (muP, Yang et al. 2022, "Tensor Programs V", Table 3).

With ``use_mup`` a model of hidden size ``h`` is described relative to a base model of hidden size
``mup_base_width``, the width multiplier being ``m = h / mup_base_width``:

- hidden matrices (attention and MLP projections): init std / sqrt(m), Adam learning rate / m;
- input weights (token and position embeddings): init and learning rate independent of m, output
  times ``mup_embedding_mult``;
- output logits times ``mup_output_temp / m``; the output weight's init std times sqrt(m) (so the
  logits start as in the standard parametrisation, as the mup package's MuReadout does) and its
  learning rate independent of m (a tied output layer is the input embedding, unscaled);
- attention scores scaled by 1/head_dim instead of 1/sqrt(head_dim) (megatron/model/attention.py);
- norms and biases: unchanged.

At ``h == mup_base_width`` the model equals the standard parametrisation (apart from the attention
scale and the multipliers), so hyperparameters tuned on the base model transfer to wider ones.
``tools/mup_coord_check.py`` checks the implementation: activation scales stay flat in width.
"""

from __future__ import annotations

from typing import Any

import torch


def width_multiplier(config: Any) -> float:
    """m = hidden_size / mup_base_width under muP, else 1 (of a ModelConfig, or of a NeoX config:
    the same keys)."""
    if not config.use_mup:
        return 1.0
    if not config.mup_base_width:
        raise ValueError(
            "use_mup needs mup_base_width: the hidden_size the hyperparameters were tuned at"
        )
    return config.hidden_size / config.mup_base_width


def base_width(config: Any) -> int:
    """The hidden size width-dependent init formulas use: the base width under muP."""
    return config.mup_base_width if config.use_mup else config.hidden_size


def mark_width_independent(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Tag a matrix whose learning rate muP keeps fixed (embeddings, the output layer)."""
    param.mup_width_independent = True
    return param


def is_hidden_matrix(param: torch.nn.Parameter) -> bool:
    """A weight with both dimensions proportional to the width (muP scales its Adam lr by 1/m)."""
    return param.ndim >= 2 and not getattr(param, "mup_width_independent", False)
