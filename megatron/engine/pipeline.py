"""GPTModel as a DeepSpeed ``PipelineModule`` and its train step (pipe_parallel_size >= 2).

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
from collections.abc import Callable, Iterator
from typing import Any

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megatron import mpu
from megatron.engine.nonfinite import NonFiniteGuard
from megatron.engine.parallelize import parallelize
from megatron.engine.step import Metrics, TrainStep
from megatron.losses import LossContext, ltor, pipeline_loss
from megatron.model.activation_checkpointing import checkpointed
from megatron.model.config import ModelConfig
from megatron.model.embedding import EmbeddingLayer
from megatron.model.gpt_model import FinalNorm, LMHead
from megatron.model.transformer import TransformerLayer
from megatron.mpu.initialize import sequence_parallel_is_on

TIED_KEY = "embed"
TIED_PREFIX = f"tied_modules.{TIED_KEY}."
# Only the transformer blocks are recomputed in the backward pass (NeoX's choice).
CHECKPOINTABLE_LAYERS = [TransformerLayer.__name__]

# A micro-batch as the pipeline engine takes it: (first stage's input, last stage's labels).
PipeBatch = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class TiedHead:
    """The LM head over the tied embedding module (a ``TiedLayerSpec`` forward_fn)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def __call__(self, embedding: EmbeddingLayer, hidden: torch.Tensor) -> torch.Tensor:
        # A tied LMHead owns no parameter: building it per call only binds the embedding.
        return LMHead(self.config, tied_embedding=embedding, parallel_output=True)(hidden)


def layer_specs(config: ModelConfig) -> list[LayerSpec]:
    """embedding, blocks 0..num_layers-1, final norm, head: the sequential model's order."""
    tied = not config.no_weight_tying
    embedding = (
        TiedLayerSpec(TIED_KEY, EmbeddingLayer, config, tied_weight_attr="word_embeddings.weight")
        if tied
        else LayerSpec(EmbeddingLayer, config)
    )
    head = (
        TiedLayerSpec(
            TIED_KEY,
            EmbeddingLayer,
            config,
            forward_fn=TiedHead(config),
            tied_weight_attr="word_embeddings.weight",
        )
        if tied
        else LayerSpec(LMHead, config, None, True)
    )
    blocks = [LayerSpec(TransformerLayer, config, i) for i in range(config.num_layers)]
    return [embedding, *blocks, LayerSpec(FinalNorm, config), head]


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
    # The stages take the sequential model's tensor- and sequence-parallel plan.
    return parallelize(model, args.sequence_parallel)


class PipelineStep(TrainStep):
    """DeepSpeed's pipeline engine runs every micro-batch of a step and the optimizer step; the
    loss it returns is already the mean over micro-batches and data-parallel ranks."""

    engine_mpu = None  # a PipelineModule brings its own grid

    def build_model(self, device: torch.device) -> nn.Module:
        model = build_pipeline_model(self.args)
        model.loss_fn = observed(model.loss_fn, self.guard)  # the last stage's losses
        return model

    def deepspeed_config(self) -> dict:
        config = super().deepspeed_config()
        if sequence_parallel_is_on(self.args):
            # DeepSpeed splits the hidden state sent between stages over the tensor ranks,
            # assuming each holds all of it; sequence-parallel ranks hold different positions.
            config.setdefault("pipeline", {}).update(pipe_partitioned=False, grad_partitioned=False)
        return config

    def norm_group(self, model: nn.Module) -> Any:
        return model.mpu().get_model_parallel_group()  # pipe x tensor ranks

    def batches(self, loader: Iterator[dict], ctx: LossContext) -> Iterator[PipeBatch]:
        return pipe_batches(loader, ctx)

    def train(self, batches: Iterator[PipeBatch], ctx: LossContext) -> Metrics:
        return self.with_grad_norm({"lm_loss": self.engine.train_batch(batches)})

    @torch.no_grad()
    def eval_losses(self, batches: Iterator[PipeBatch], ctx: LossContext, iters: int) -> Metrics:
        self.engine.eval()
        losses = [self.engine.eval_batch(batches) for _ in range(iters)]
        self.engine.train()
        return {"lm_loss": torch.stack(losses).mean()}


def observed(loss_fn: Callable, guard: NonFiniteGuard) -> Callable:
    def loss(*args: Any) -> torch.Tensor:
        value = loss_fn(*args)
        guard.observe(value)
        return value

    return loss


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
