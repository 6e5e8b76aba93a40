"""The orthogonalisations Muon applies to a momentum matrix: the nearest semi-orthogonal matrix
U V^T of its SVD, exactly (``svd``) or approximately (``newton_schulz``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

# The quintic iteration's coefficients tuned by Keller Jordan for modded-nanogpt: they push every
# singular value in (0, 1] into roughly [0.7, 1.2] in 5 steps instead of converging to exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def newton_schulz(matrix: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """U V^T of ``matrix`` approximately, computed in ``dtype``, returned in fp32."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:  # X X^T is then the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # singular values into [0, 1], where the iteration converges
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).float()


def svd_orthogonalize(matrix: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U V^T of ``matrix`` exactly (fp32 SVD; ``dtype`` is not used)."""
    u, _, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u @ vh


ORTHOGONALIZERS: dict[str, Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = {
    "newton_schulz": newton_schulz,
    "svd": svd_orthogonalize,
}
