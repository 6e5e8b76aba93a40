"""GPTModel as a DeepSpeed ``PipelineModule`` (pipe_parallel_size >= 2).

The stages are built from the same layer classes as the sequential model: the embedding, one
``TransformerLayer`` per block, the final norm and the LM head. Each layer draws its weights from
its own ``init_rng`` stream, so a stage builds exactly the weights the sequential model holds for
those layers. With tied embeddings the first and last stages share one ``TiedLayerSpec`` (key
``"embed"``); DeepSpeed all-reduces its gradient between them.

DeepSpeed names a stage's parameters ``{spec index}.{name}`` and ``tied_modules.embed.{name}``;
``canonical_name`` maps them back to the sequential model's names (docs/interfaces.md), which is
what layout-free checkpoints store.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron import mpu
from megatron.data.masks import masked_mean
from megatron.losses import LossContext, ltor
from megatron.model.activation_checkpointing import checkpointed
from megatron.model.config import ModelConfig
from megatron.model.embedding import EmbeddingLayer
from megatron.model.gpt_model import FinalNorm, LMHead
from megatron.model.transformer import TransformerLayer
from megatron.mpu.initialize import sequence_parallel_is_on
from megatron.mpu.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

TIED_KEY = "embed"
TIED_PREFIX = f"tied_modules.{TIED_KEY}."
# Only the transformer blocks are recomputed in the backward pass (NeoX's choice).
CHECKPOINTABLE_LAYERS = [TransformerLayer.__name__]

# A micro-batch as the pipeline engine takes it: (first stage's input, last stage's labels).
PipeBatch = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class EmbeddingStage(EmbeddingLayer):
    """The embedding; with sequence_parallel its output is this rank's positions, as in
    GPTModel."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.sequence_parallel = sequence_parallel_is_on(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = super().forward(input_ids)
        return scatter_to_sequence_parallel_region(h) if self.sequence_parallel else h


class FinalNormStage(FinalNorm):
    """The final norm; with sequence_parallel it gathers every position for the head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.sequence_parallel = sequence_parallel_is_on(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x)
        if self.sequence_parallel:  # the head's input copy already sums the gradient
            h = gather_from_sequence_parallel_region(h, grad_is_partial=False)
        return h


class TiedHead:
    """The LM head over the tied embedding module (a ``TiedLayerSpec`` forward_fn)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def __call__(self, embedding: EmbeddingLayer, hidden: torch.Tensor) -> torch.Tensor:
        # A tied LMHead owns no parameter: building it per call only binds the embedding.
        return LMHead(self.config, tied_embedding=embedding, parallel_output=True)(hidden)


def pipeline_loss(logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """train_impl 'normal' on the last stage: mean next-token loss where loss_mask is 1."""
    targets, loss_mask = labels
    return masked_mean(mpu.vocab_parallel_cross_entropy(logits, targets), loss_mask)


def layer_specs(config: ModelConfig) -> list[LayerSpec]:
    """embedding, blocks 0..num_layers-1, final norm, head: the sequential model's order."""
    tied = not config.no_weight_tying
    embedding = (
        TiedLayerSpec(TIED_KEY, EmbeddingStage, config, tied_weight_attr="word_embeddings.weight")
        if tied
        else LayerSpec(EmbeddingStage, config)
    )
    head = (
        TiedLayerSpec(
            TIED_KEY,
            EmbeddingStage,
            config,
            forward_fn=TiedHead(config),
            tied_weight_attr="word_embeddings.weight",
        )
        if tied
        else LayerSpec(LMHead, config, None, True)
    )
    blocks = [LayerSpec(TransformerLayer, config, i) for i in range(config.num_layers)]
    return [embedding, *blocks, LayerSpec(FinalNormStage, config), head]


class GPTPipeline(PipelineModule):
    """A PipelineModule that knows the canonical name of each of its parameters."""

    def __init__(self, config: ModelConfig, **kwargs: Any) -> None:
        super().__init__(layers=layer_specs(config), **kwargs)
        self.num_transformer_layers = config.num_layers

    def canonical_named_parameters(
        self, replicas: bool = True
    ) -> list[tuple[str, torch.nn.Parameter]]:
        """(canonical name, parameter) of this stage; ``replicas=False`` leaves out the last
        stage's copy of a tied embedding (the first stage owns it)."""
        return [
            (canonical_name(name, self.num_transformer_layers), param)
            for name, param in self.named_parameters()
            if replicas or not getattr(param, "ds_pipe_replicated", False)
        ]


def build_pipeline_model(args: Any) -> GPTPipeline:
    """This process's stage of the pipeline (needs torch.distributed and mpu's grid)."""
    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipe_parallel_world_size()
    dp = mpu.get_data_parallel_world_size()
    config = ModelConfig.from_neox(args)
    model = GPTPipeline(
        config,
        topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
        loss_fn=pipeline_loss,
        partition_method=args.pipe_partition_method,
        activation_checkpoint_interval=config.checkpoint_num_layers,
        activation_checkpoint_func=checkpointed,
        checkpointable_layers=CHECKPOINTABLE_LAYERS,
    )
    mark_norm_ownership(model)
    return model


def adjust_deepspeed_config(args: Any, config: dict) -> None:
    """Engine settings these stages need, set in the DeepSpeed config dict in place."""
    if sequence_parallel_is_on(args):
        # DeepSpeed splits the hidden state sent between stages over the tensor ranks, assuming
        # each holds all of it; sequence-parallel ranks hold different positions.
        config.setdefault("pipeline", {}).update(pipe_partitioned=False, grad_partitioned=False)


def mark_norm_ownership(model: PipelineModule) -> None:
    """Tell DeepSpeed which gradients this rank counts in the global norm (clipping, ZeRO).

    DeepSpeed counts a parameter when its model-parallel rank (over pipe x tensor) is 0 or the
    parameter has ``model_parallel`` set. Every stage must count its own layers; a weight
    replicated across tensor ranks counts on tensor rank 0 only, and the tied embedding's copy
    on the last stage (``ds_pipe_replicated``) not at all, so each full weight counts once.
    """
    tensor_rank = mpu.get_tensor_model_parallel_rank()
    for param in model.parameters():
        replicated_copy = getattr(param, "ds_pipe_replicated", False)
        split = hasattr(param, "partition_dim")
        param.model_parallel = not replicated_copy and (split or tensor_rank == 0)
        if replicated_copy and getattr(param, "tensor_model_parallel", False):
            param.tensor_model_parallel = False


def plain_optimizer(args: Any) -> bool:
    """Whether DeepSpeed steps our optimizer directly (fp32, ZeRO 0): it then clips gradients
    but does not report their norm, so a ``GradNormClipper`` does both instead."""
    return args.precision == "fp32" and not args.zero_stage


class GradNormClipper:
    """An optimizer step pre-hook: the whole model's gradient norm over every stage (and tensor
    rank), recorded in ``norm`` and used to clip to ``max_norm`` (0: no clipping) like
    DeepSpeed's clip_grad_norm_. Counts the parameters ``mark_norm_ownership`` marked."""

    def __init__(self, model: PipelineModule, max_norm: float) -> None:
        self.parameters = list(model.parameters())
        self.counted = [p for p in self.parameters if p.model_parallel]
        self.group = model.mpu().get_model_parallel_group()
        self.max_norm = max_norm
        self.norm: float | None = None

    @torch.no_grad()
    def __call__(self, *_: Any) -> None:
        grads = [p.grad for p in self.counted if p.grad is not None]
        square = torch.zeros((), dtype=torch.float64, device=self.parameters[0].device)
        for grad in grads:
            square += grad.double().pow(2).sum()
        torch.distributed.all_reduce(square, group=self.group)
        self.norm = square.sqrt().item()
        coefficient = self.max_norm / (self.norm + 1e-6)
        if self.max_norm > 0 and coefficient < 1:
            for param in self.parameters:
                if param.grad is not None:
                    param.grad.mul_(coefficient)


def pipe_batches(batches: Iterator[dict], ctx: LossContext) -> Iterator[PipeBatch]:
    """Loader micro-batches -> (tokens, (labels, loss_mask)) through get_ltor_batch."""
    for batch in batches:
        inputs = ltor(batch["text"], batch.get("label"), ctx)
        yield inputs.tokens, (inputs.labels, inputs.loss_mask)


_LAYER_NAME = re.compile(r"(\d+)\.(.+)")


def canonical_name(name: str, num_layers: int) -> str:
    """A PipelineModule parameter/buffer name -> GPTModel's name for the same tensor.

    Spec index 0 is the embedding, 1..num_layers the blocks, then the final norm and the head.
    """
    if name.startswith(TIED_PREFIX):
        return "embedding." + name[len(TIED_PREFIX) :]
    match = _LAYER_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a pipeline layer's name (expected '<index>.<name>')")
    index, rest = int(match.group(1)), match.group(2)
    if index == 0:
        return f"embedding.{rest}"
    if index <= num_layers:
        return f"layers.{index - 1}.{rest}"
    if index == num_layers + 1:
        return f"final_norm.{rest}"
    if index == num_layers + 2:
        return f"lm_head.{rest}"
    raise ValueError(f"{name!r}: layer index {index} is past the head ({num_layers + 2})")
