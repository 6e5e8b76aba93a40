"""NeoX's DeepSpeed argument groups: the engine config and the launcher (runner)."""

from dataclasses import dataclass
from typing import Literal

from megatron.neox_arguments.fields import Support, arg

DEFAULT_ONLY, DERIVED = Support.DEFAULT_ONLY, Support.DERIVED

LAUNCHERS = ("pdsh", "openmpi", "mvapich", "slurm", "torchrun", "srun")


@dataclass
class NeoXArgsDeepspeedConfig:
    """Keys that end up in the DeepSpeed config."""

    deepspeed: bool = arg(True, "DeepSpeed is always the engine.")
    train_batch_size: int | None = arg(None, "Global batch size in samples per optimizer step.")
    train_micro_batch_size_per_gpu: int | Literal["auto"] | None = arg(
        None,
        "Samples per rank per forward pass; auto (with train_batch_size): the largest that fits "
        "(probed on CUDA, estimated elsewhere), accumulation making up the rest.",
    )
    gradient_accumulation_steps: int | None = arg(
        None, "Micro-batches per optimizer step; derived from the other two (1 when unset)."
    )
    optimizer: dict | None = arg(None, "Optimizer: {type, params: {lr, betas, eps, ...}}.")
    scheduler: dict | None = arg(
        None, "DeepSpeed scheduler (Strata schedules from lr_decay_style).", DEFAULT_ONLY
    )
    fp32_allreduce: bool = arg(False, "All-reduce gradients in fp32.")
    prescale_gradients: bool = arg(False, "Scale gradients before the all-reduce.")
    gradient_predivide_factor: float = arg(1.0, "Divide gradients by this before averaging.")
    sparse_gradients: bool = arg(False, "Sparse embedding gradients.")
    fp16: dict | None = arg(None, "DeepSpeed fp16 settings ({enabled, loss_scale, ...}).")
    bf16: dict | None = arg(None, "DeepSpeed bf16 settings ({enabled}).")
    amp: dict | None = arg(None, "Apex AMP settings.", DEFAULT_ONLY)
    gradient_clipping: float = arg(1.0, "Clip gradients to this global L2 norm (0 = off).")
    zero_optimization: dict | None = arg(None, "DeepSpeed ZeRO settings ({stage, ...}).")
    curriculum_learning: dict | None = arg(None, "Curriculum learning.", DEFAULT_ONLY)
    curriculum_seqlen: int = arg(0, "Current curriculum sequence length.", DERIVED)
    steps_per_print: int = arg(10, "DeepSpeed prints progress every this many steps.")
    wall_clock_breakdown: bool = arg(False, "DeepSpeed times forward/backward/step.")
    dump_state: bool = arg(False, "DeepSpeed prints its state after initialisation.")
    flops_profiler: dict | None = arg(None, "DeepSpeed FLOPs profiler.")
    communication_data_type: str | None = arg(None, "Data type of gradient communication.")
    autotuning: dict | None = arg(None, "DeepSpeed autotuning.", DEFAULT_ONLY)
    activation_checkpointing: dict | None = arg(None, "DeepSpeed activation checkpointing.")
    sparse_attention: dict | None = arg(None, "DeepSpeed sparse attention.", DEFAULT_ONLY)
    data_efficiency: dict | None = arg(None, "DeepSpeed data efficiency.", DEFAULT_ONLY)
    tensorboard: dict | None = arg(None, "DeepSpeed's own TensorBoard monitor.")
    wandb: dict | None = arg(None, "DeepSpeed's own W&B monitor.")
    csv_monitor: dict | None = arg(None, "DeepSpeed's own CSV monitor.")
    elasticity: dict | None = arg(None, "DeepSpeed elastic training.", DEFAULT_ONLY)
    comms_logger: dict | None = arg(None, "DeepSpeed communication logger.")
    compression_training: dict | None = arg(None, "DeepSpeed compression.", DEFAULT_ONLY)
    checkpoint: dict | None = arg(
        None, "DeepSpeed checkpoint options (Strata has its own format).", DEFAULT_ONLY
    )
    data_types: dict | None = arg(None, "DeepSpeed data types (e.g. grad_accum_dtype).")
    deepspeed_extra_args: dict | None = arg(None, "Further keys copied into the DeepSpeed config.")


@dataclass
class NeoXArgsDeepspeedRunner:
    """Keys that shape the launch command."""

    hostfile: str | None = arg(None, "Hostfile: one 'hostname slots=N' per line.")
    include: str | None = arg(None, "Hosts/slots to use, e.g. 'worker-0@worker-1:0,2'.")
    exclude: str | None = arg(None, "Hosts/slots to leave out (same format as include).")
    num_nodes: int = arg(-1, "Nodes to use (the first N of the hostfile); -1 = all.")
    num_gpus: int | None = arg(None, "Processes (GPUs) per node; all visible GPUs (or 1 on CPU).")
    master_port: int | None = arg(
        None, "Rendezvous port; DeepSpeed's 29500, or a free port for local CPU runs."
    )
    master_addr: str | None = arg(None, "Address of the first node.")
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm", "torchrun", "srun"] = arg(
        "pdsh", "How processes are started (DeepSpeed runner backends, torchrun or srun)."
    )
    force_multi: bool = arg(False, "Force DeepSpeed's multi-node mode.")
    detect_nvlink_pairs: bool = arg(False, "DeeperSpeed NVLink pair remapping.", DEFAULT_ONLY)
    autotuning_run: str | None = arg(None, "DeepSpeed autotuning mode.", DEFAULT_ONLY)
    no_ssh_check: bool = arg(False, "Skip DeepSpeed's ssh check of the head node.")
    comment: str | None = arg(None, "Slurm --comment for the job steps.")
    account: str | None = arg(None, "Slurm --account for the job steps.")
