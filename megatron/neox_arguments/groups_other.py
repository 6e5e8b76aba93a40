"""NeoX's smaller argument groups, plus the values Strata derives."""

from dataclasses import dataclass
from typing import Annotated, Literal

from megatron.neox_arguments.fields import Support, arg
from megatron.neox_arguments.typecheck import Registered

DEFAULT_ONLY, HINT, DERIVED = Support.DEFAULT_ONLY, Support.HINT, Support.DERIVED


@dataclass
class NeoXArgsParallelism:
    """Parallelism arguments."""

    pipe_parallel_size: int = arg(0, "Pipeline stages; 0 and 1 both mean no pipeline.")
    model_parallel_size: int = arg(1, "Tensor-parallel size.")
    pipe_partition_method: str = arg(
        "type:transformer|mlp", "How layers are balanced over pipeline stages."
    )
    world_size: int | None = arg(None, "Processes in the job (set by the launcher).", DERIVED)
    is_pipe_parallel: bool = arg(False, "Whether pipeline parallelism is on.", DERIVED)
    sequence_parallel: bool = arg(
        False,
        "Megatron sequence parallelism: activations between tensor-parallel regions are split "
        "along the sequence (no effect at model_parallel_size 1; training only).",
    )
    expert_interval: int = arg(
        2, "One MoE layer every this many layers (with MoE).", gate="moe_num_experts"
    )


@dataclass
class NeoXArgsOptimizer:
    """Optimizer arguments (the optimizer itself is the `optimizer` dict)."""

    optimizer_type: str | None = arg(None, "Optimizer name, from optimizer.type.", DERIVED)
    use_bnb_optimizer: bool = arg(False, "Use bitsandbytes optimizers.", DEFAULT_ONLY)
    zero_stage: int | None = arg(None, "ZeRO stage, from zero_optimization.stage.", DERIVED)
    zero_reduce_scatter: bool | None = arg(None, "From zero_optimization.", DERIVED)
    zero_contiguous_gradients: bool | None = arg(None, "From zero_optimization.", DERIVED)
    zero_reduce_bucket_size: int | None = arg(None, "From zero_optimization.", DERIVED)
    zero_allgather_bucket_size: int | None = arg(None, "From zero_optimization.", DERIVED)
    lr: float | None = arg(None, "Peak learning rate, from optimizer.params.lr.", DERIVED)


@dataclass
class NeoXArgsLRScheduler:
    """Learning-rate schedule arguments."""

    lr_decay_style: Annotated[str, Registered("lr_decay_style")] = arg(
        "linear",
        "Decay shape after warmup (megatron/learning_rates.py registry): constant, linear, "
        "cosine, exponential (halves every decay span, as NeoX), inv_sqrt, wsd.",
    )
    wsd_decay_fraction: float = arg(
        0.2, "wsd: decay over this final fraction of lr_decay_iters (stable at the peak before)."
    )
    wsd_decay_shape: Literal["linear", "cosine", "1-sqrt"] = arg(
        "linear", "wsd: shape of the final decay to min_lr."
    )
    lr_decay_iters: int | None = arg(None, "Iterations to decay over; train_iters when unset.")
    lr_decay_fraction: float | None = arg(
        None, "Decay over this fraction of train_iters (instead of lr_decay_iters)."
    )
    min_lr: float = arg(0.0, "Floor of the learning rate.")
    warmup: float = arg(0.01, "Warmup length as a fraction of the decay iterations.")
    override_lr_scheduler: bool = arg(
        False, "Take schedule settings from the config on resume (else they must match)."
    )
    use_checkpoint_lr_scheduler: bool = arg(
        False, "Take schedule settings from the checkpoint on resume."
    )


@dataclass
class NeoXArgsLogging:
    """Logging arguments."""

    use_wandb: bool = arg(False, "Log to Weights & Biases.")
    wandb_group: str | None = arg(None, "W&B group name.")
    wandb_team: str | None = arg(None, "W&B team (entity).")
    wandb_project: str = arg("neox", "W&B project.")
    wandb_host: str = arg("https://api.wandb.ai", "W&B host URL.")
    wandb_init_all_ranks: bool = arg(False, "Start W&B on every rank.")
    wandb_run_name: str | None = arg(
        None,
        "W&B run name template, e.g. {experiment}_{cluster}_{job_id} (megatron/run_naming.py).",
    )
    wandb_tags: list | None = arg(None, "W&B run tags.")
    wandb_notes: str | None = arg(None, "W&B run notes.")
    git_hash: str | None = arg(None, "Git revision of the code that launched the run.", DERIVED)
    log_dir: str | None = arg(None, "Directory for logs and metrics.jsonl.")
    tensorboard_dir: str | None = arg(None, "Directory for TensorBoard event files.")
    use_comet: bool | None = arg(None, "Log to Comet.", DEFAULT_ONLY)
    comet_workspace: str | None = arg(None, "Comet workspace (with use_comet).", gate="use_comet")
    comet_project: str | None = arg(None, "Comet project (with use_comet).", gate="use_comet")
    comet_experiment_name: str | None = arg(
        None, "Comet experiment name (with use_comet).", gate="use_comet"
    )
    comet_tags: list | None = arg(None, "Comet tags (with use_comet).", gate="use_comet")
    comet_others: dict | None = arg(None, "Comet metadata (with use_comet).", gate="use_comet")
    log_interval: int = arg(100, "Iterations between training log lines.")
    log_grad_pct_zeros: bool = arg(False, "Log the fraction of zero gradients.", DEFAULT_ONLY)
    log_param_norm: bool = arg(False, "Log parameter norms.", DEFAULT_ONLY)
    log_grad_norm: bool = arg(False, "Log gradient norms (Strata always logs grad_norm).", HINT)
    log_optimizer_states: bool = arg(False, "Log optimizer-state norms.", DEFAULT_ONLY)
    log_gradient_noise_scale: bool = arg(False, "Log the gradient noise scale.", DEFAULT_ONLY)
    gradient_noise_scale_n_batches: int = arg(
        5, "Batches for the gradient noise scale.", gate="log_gradient_noise_scale"
    )
    gradient_noise_scale_cpu_offload: bool = arg(
        False, "Offload gradient-noise buffers to CPU.", gate="log_gradient_noise_scale"
    )
    memory_profiling: bool = arg(False, "Take a CUDA memory snapshot.", DEFAULT_ONLY)
    memory_profiling_path: str | None = arg(
        None, "Where to write the memory snapshot.", gate="memory_profiling"
    )
    profile: bool = arg(False, "Enable nsys/PyTorch profiling.", DEFAULT_ONLY)
    profile_step_start: int = arg(10, "First profiled step (with profile).", gate="profile")
    profile_step_stop: int = arg(12, "Last profiled step (with profile).", gate="profile")


@dataclass
class NeoXArgsTokenizer:
    """Tokenizer arguments."""

    tokenizer_type: str = arg(
        "GPT2BPETokenizer",
        "Registered tokenizer name: GPT2BPETokenizer, HFTokenizer, HFGPT2Tokenizer, SPMTokenizer, "
        "TiktokenTokenizer, CharLevelTokenizer, bytes.",
    )
    vocab_file: str | None = arg(
        None, "vocab.json, tokenizer.json or its directory, SentencePiece .model, .tiktoken."
    )
    merge_file: str | None = arg(None, "BPE merges file (GPT2BPETokenizer, HFGPT2Tokenizer).")
    padded_vocab_size: int | None = arg(None, "Vocabulary size after padding.", DERIVED)


@dataclass
class NeoXArgsTextgen:
    """Text generation, evaluation and mixture-of-experts arguments."""

    text_gen_type: str | None = arg(
        None, "unconditional, input-file, interactive or precompute; derived when unset."
    )
    precompute_model_name: str | None = arg(None, "Name for precomputed log-probabilities.")
    temperature: float = arg(0.0, "Sampling temperature (0 = greedy).")
    top_p: float = arg(0.0, "Nucleus sampling threshold (0 = off).")
    top_k: int = arg(0, "Top-k sampling (0 = off).")
    return_logits: bool = arg(False, "Return logits of generated tokens.")
    maximum_tokens: int = arg(64, "Maximum number of generated tokens.")
    prompt_end: str = arg("\n", "Separator ending each prompt in the input file.")
    sample_input_file: str | None = arg(None, "File of prompts, one per line.")
    sample_output_file: str = arg("samples.txt", "File to write generations to.")
    num_samples: int = arg(1, "Unconditional samples to generate.")
    recompute: bool = arg(False, "Recompute attention instead of using the KV cache.")
    stop_tokens: list | None = arg(
        None, "generate.py also stops at these: token ids, or strings (cut from the text)."
    )
    apply_chat_template: bool = arg(
        False, "generate.py sends each prompt as a user turn through the tokenizer's chat template."
    )
    eval_results_prefix: str = arg(
        "", "eval.py writes {eval_results_prefix}_eval_results_{timestamp}.json."
    )
    eval_tasks: list | None = arg(
        None, "lm-evaluation-harness task names eval.py scores (configs/eval_tasks/ is included)."
    )
    eval_include_path: list | None = arg(
        None, "Further folders of lm-evaluation-harness task YAMLs (lm_eval --include_path)."
    )
    eval_num_fewshot: int | None = arg(
        None, "Few-shot examples per prompt; the tasks' own when unset."
    )
    eval_limit: int | None = arg(None, "Score only the first N documents of each task.")
    eval_batch_size: int = arg(16, "Requests per forward pass in eval.py.")
    eval_tasks_interval: int | None = arg(
        None, "train.py runs eval_tasks every this many iterations and at the end (off: unset)."
    )
    eval_apply_chat_template: bool = arg(
        False, "Wrap eval prompts in the tokenizer's chat template (instruction-tuned models)."
    )
    moe_top_k: int = arg(1, "Experts per token (with MoE).", gate="moe_num_experts")
    use_tutel: bool = arg(False, "Tutel MoE kernels (with MoE).", gate="moe_num_experts")
    moe_num_experts: int = arg(1, "Number of MoE experts (1 = dense).", DEFAULT_ONLY)
    moe_loss_coeff: float = arg(
        0.1, "MoE auxiliary loss coefficient (with MoE).", gate="moe_num_experts"
    )
    moe_train_capacity_factor: float = arg(
        1.0, "Expert capacity in training (with MoE).", gate="moe_num_experts"
    )
    moe_eval_capacity_factor: float = arg(
        1.0, "Expert capacity in evaluation (with MoE).", gate="moe_num_experts"
    )
    moe_min_capacity: int = arg(4, "Minimum expert capacity (with MoE).", gate="moe_num_experts")
    moe_token_dropping: bool = arg(
        False, "Drop tokens over capacity (with MoE).", gate="moe_num_experts"
    )
    create_moe_param_group: bool = arg(
        True, "Separate MoE parameter group (with MoE).", gate="moe_num_experts"
    )
    moe_use_residual: bool = arg(True, "Residual MoE (with MoE).", gate="moe_num_experts")
    moe_expert_parallel_size: int = arg(
        1, "Expert-parallel size (with MoE).", gate="moe_num_experts"
    )
    moe_type: str = arg("megablocks", "MoE implementation (with MoE).", gate="moe_num_experts")
    moe_glu: bool = arg(False, "Gated experts (with MoE).", gate="moe_num_experts")
    moe_lbl_in_fp32: bool = arg(
        False, "Load-balancing loss in fp32 (with MoE).", gate="moe_num_experts"
    )
    moe_jitter_eps: float | None = arg(None, "Router jitter (with MoE).", gate="moe_num_experts")
    enable_expert_tensor_parallelism: bool = arg(
        False, "Expert tensor parallelism (with MoE).", gate="moe_num_experts"
    )


@dataclass
class NeoXArgsOther:
    """Miscellaneous arguments."""

    distributed_backend: str = arg("nccl", "torch.distributed backend on GPUs (gloo on CPU).")
    distributed_timeout_minutes: float = arg(
        10.0,
        "Minutes a collective may wait before the job stops with the rank and the collective "
        "named (Megatron-LM's key; fractions allowed); a train step this long dumps the stacks.",
    )
    local_rank: int | None = arg(None, "Local rank (set by the launcher).", DERIVED)
    rank: int | None = arg(None, "Global rank (set by the launcher).", DERIVED)
    lazy_mpu_init: bool = arg(False, "Defer model-parallel initialisation.", DEFAULT_ONLY)
    short_seq_prob: float = arg(
        0.1,
        "Probability of a short sequence (BERT-style data; NeoX reads it nowhere).",
        DEFAULT_ONLY,
    )
    adlr_autoresume: bool = arg(False, "ADLR cluster auto-resume.", DEFAULT_ONLY)
    adlr_autoresume_interval: int = arg(
        1000, "Auto-resume check interval (with adlr_autoresume).", gate="adlr_autoresume"
    )
    seed: int = arg(1234, "Random seed for Python, NumPy and PyTorch.")
    onnx_safe: bool = arg(False, "Workarounds for the ONNX exporter.", HINT)
    deepscale: bool = arg(False, "Deprecated DeepSpeed flag with no effect.", HINT)
    deepscale_config: str | None = arg(None, "Deprecated DeepSpeed config path.", DEFAULT_ONLY)
    deepspeed_mpi: bool = arg(False, "Discover ranks from the MPI environment.")
    deepspeed_slurm: bool = arg(False, "Discover ranks from the Slurm environment.")
    user_script: str | None = arg(None, "Script the launcher runs (set by deepy.py).", DERIVED)
    iteration: int | None = arg(
        None, "Load global_step{iteration} of `load` instead of the checkpoint `latest` names."
    )
    do_train: bool | None = arg(None, "Set during training.", DERIVED)
    do_valid: bool | None = arg(None, "Set during training.", DERIVED)
    do_test: bool | None = arg(None, "Set during training.", DERIVED)
    global_num_gpus: int | None = arg(
        None, "World size; from num_gpus x num_nodes (or the hostfile) when unset."
    )
    device_memory: str | None = arg(
        None,
        "Strata: memory of one accelerator (e.g. 80GB) for the memory estimate's verdict and for "
        "automatic micro-batch sizing without CUDA (default: the host's available memory).",
    )
    auto_batch_memory_fraction: float = arg(
        0.9, "Strata: share of the device memory automatic micro-batch sizing may fill."
    )


@dataclass
class NeoXArgsDerived:
    """Values Strata computes from the keys above (not NeoX keys)."""

    data_parallel_size: int | None = arg(None, "World size / (tensor x pipeline).", DERIVED)
    ffn_hidden_size: int | None = arg(None, "Width of the MLP activation.", DERIVED)
    num_parameters: int | None = arg(None, "Total parameter count.", DERIVED)
    tokens_per_step: int | None = arg(None, "train_batch_size x seq_length.", DERIVED)
    total_tokens: int | None = arg(None, "tokens_per_step x train_iters.", DERIVED)
    save_iters: list | None = arg(None, "Iterations at which checkpoints are saved.", DERIVED)
    auto_micro_batch: bool = arg(
        False, "train_micro_batch_size_per_gpu was auto: the run may size it again.", DERIVED
    )
