"""NeoX's training argument group: data, checkpoints, schedule lengths, regularisation."""

from dataclasses import dataclass
from typing import Annotated, Literal

from megatron.neox_arguments.fields import Support, arg
from megatron.neox_arguments.typecheck import Registered

DEFAULT_ONLY, HINT, DERIVED = Support.DEFAULT_ONLY, Support.HINT, Support.DERIVED


@dataclass
class NeoXArgsTraining:
    """Training arguments."""

    data_path: str | None = arg(
        None, "Prefix of one dataset (.bin/.idx) split into train/valid/test."
    )
    use_shared_fs: bool = arg(True, "Data index files live on a filesystem shared by all nodes.")
    label_data_paths: list | None = arg(
        None, "Label dataset matching data_path (one prefix; -100 = no loss)."
    )
    train_data_paths: list | None = arg(None, "Prefixes of the training datasets.")
    train_label_data_paths: list | None = arg(
        None, "Label datasets matching train_data_paths one to one (-100 = no loss)."
    )
    train_reward_data_paths: list | None = arg(None, "Prefixes of training reward datasets.")
    test_data_paths: list | None = arg(None, "Prefixes of the test datasets.")
    test_label_data_paths: list | None = arg(None, "Label datasets matching test_data_paths.")
    test_reward_data_paths: list | None = arg(None, "Prefixes of test reward datasets.")
    valid_data_paths: list | None = arg(None, "Prefixes of the validation datasets.")
    valid_label_data_paths: list | None = arg(None, "Label datasets matching valid_data_paths.")
    valid_reward_data_paths: list | None = arg(None, "Prefixes of validation reward datasets.")
    pos_train_data_paths: list | None = arg(None, "Chosen (positive) training datasets for DPO.")
    neg_train_data_paths: list | None = arg(None, "Rejected (negative) training datasets for DPO.")
    pos_train_label_data_paths: list | None = arg(None, "Labels of the chosen training datasets.")
    neg_train_label_data_paths: list | None = arg(None, "Labels of the rejected training datasets.")
    pos_valid_data_paths: list | None = arg(None, "Chosen validation datasets for DPO.")
    neg_valid_data_paths: list | None = arg(None, "Rejected validation datasets for DPO.")
    pos_valid_label_data_paths: list | None = arg(None, "Labels of the chosen validation datasets.")
    neg_valid_label_data_paths: list | None = arg(
        None, "Labels of the rejected validation datasets."
    )
    pos_test_data_paths: list | None = arg(None, "Chosen test datasets for DPO.")
    neg_test_data_paths: list | None = arg(None, "Rejected test datasets for DPO.")
    pos_test_label_data_paths: list | None = arg(None, "Labels of the chosen test datasets.")
    neg_test_label_data_paths: list | None = arg(None, "Labels of the rejected test datasets.")
    train_data_weights: list | None = arg(None, "Sampling weight of each training dataset.")
    valid_data_weights: list | None = arg(None, "Sampling weight of each validation dataset.")
    test_data_weights: list | None = arg(None, "Sampling weight of each test dataset.")
    weight_by_num_documents: bool = arg(
        False, "Weight blended datasets by document count (see weighted_sampler_alpha)."
    )
    weighted_sampler_alpha: float = arg(1.0, "Exponent for weight_by_num_documents.")
    data_impl: Literal["infer", "mmap", "cached"] = arg("infer", "Indexed dataset implementation.")
    pack_impl: Literal["packed", "pack_until_overflow", "unpacked"] = arg(
        "packed", "How documents are packed into sequences."
    )
    dataset_impl: Literal["gpt2", "pairwise"] = arg(
        "gpt2", "Dataset kind: LM, or pairwise (chosen/rejected documents for DPO)."
    )
    train_impl: Annotated[str, Registered("train_impl", refused=("rm",))] = arg(
        "normal", "Training objective (megatron/losses.py registry; rm is not supported yet)."
    )
    dpo_fp32: bool = arg(
        True, "DPO log-probs in fp32 (Strata always computes them so).", DEFAULT_ONLY
    )
    dpo_reference_free: bool = arg(False, "DPO without a reference model (its log-probs = 0).")
    dpo_beta: float = arg(0.1, "DPO beta.")
    kto_fp32: bool = arg(
        True, "KTO log-probs in fp32 (Strata always computes them so).", DEFAULT_ONLY
    )
    kto_desirable_weight: float = arg(1.0, "KTO weight of desirable examples.")
    kto_undesirable_weight: float = arg(1.0, "KTO weight of undesirable examples.")
    z_loss: float = arg(0.0, "Z-loss coefficient (reward-model training).", DEFAULT_ONLY)
    kto_beta: float = arg(0.1, "KTO beta.")
    allow_chopped: bool = arg(
        True, "Cut documents longer than seq_length + 1 (else skip them; whole-document packing)."
    )
    mmap_warmup: bool = arg(False, "Read the memory-mapped files once at start.", HINT)
    save: str | None = arg(None, "Directory to save checkpoints to.")
    s3_path: str | None = arg(None, "S3 bucket to upload checkpoints to.", DEFAULT_ONLY)
    s3_chunk_size: int = arg(
        104_857_600, "S3 upload chunk size in bytes (with s3_path).", gate="s3_path"
    )
    config_files: dict | None = arg(None, "Original config file texts by file name.", DERIVED)
    load: str | None = arg(None, "Directory to load a checkpoint from.")
    checkpoint_validation_with_forward_pass: bool = arg(
        False, "Check a forward pass after loading a checkpoint.", DEFAULT_ONLY
    )
    checkpoint_scale: Literal["linear", "log"] = arg(
        "linear", "Checkpoint spacing: every checkpoint_factor steps, or geometric."
    )
    checkpoint_factor: int | float | None = arg(
        None, "Save every this many steps (linear) or at powers of it (log)."
    )
    extra_save_iters: list | None = arg(None, "Further iterations at which to save.")
    no_save_optim: bool = arg(False, "Do not save the optimizer state.")
    no_save_rng: bool = arg(False, "Do not save the RNG state.")
    no_load_optim: bool = arg(False, "Do not load the optimizer state.")
    no_load_rng: bool = arg(False, "Do not load the RNG state.")
    finetune: bool = arg(False, "Load weights only and restart at iteration 0.")
    train_iters: int | None = arg(None, "Number of training iterations (optimizer steps).")
    train_epochs: int | None = arg(None, "Number of epochs (instead of train_iters).")
    eval_iters: int = arg(
        100, "Iterations per evaluation run; eval.py takes -1 for the whole valid/test split."
    )
    keep_last_n_checkpoints: int | None = arg(None, "Delete all but the newest N checkpoints.")
    verify_checkpoint: bool = arg(
        True,
        "Check the sha256 of every file of the checkpoint `load` names before loading it (the "
        "files are shared out over the ranks); false skips that extra read.",
    )
    async_save: bool = arg(
        False,
        "Copy each checkpoint to CPU memory and write it in a background thread while training "
        "continues; `latest` moves when every process has finished writing.",
    )
    skip_nonfinite_steps: int = arg(
        0,
        "A step whose loss or gradient norm is NaN/Inf is not applied; up to this many in a row "
        "are skipped, the next stops the run (saving the last good weights when `save` is set).",
    )
    eval_interval: int = arg(1000, "Iterations between evaluations.")
    split: str = arg("969, 30, 1", "Train, validation, test proportions of data_path.")
    num_workers: int = arg(2, "Data loader worker processes.")
    exit_interval: int | None = arg(None, "Exit when the iteration is a multiple of this.")
    attention_dropout: float = arg(0.0, "Dropout on attention probabilities.")
    hidden_dropout: float = arg(0.0, "Dropout on hidden states.")
    weight_decay: float = arg(0.1, "Weight decay coefficient.")
    checkpoint_activations: bool = arg(False, "Recompute activations in the backward pass.")
    checkpoint_num_layers: int = arg(1, "Layers per activation-checkpoint chunk.")
    deepspeed_activation_checkpointing: bool = arg(
        True, "Use DeepSpeed's activation checkpointing.", HINT
    )
    contiguous_checkpointing: bool = arg(False, "Contiguous activation-checkpoint memory.", HINT)
    checkpoint_in_cpu: bool = arg(False, "Keep activation checkpoints in CPU memory.", HINT)
    synchronize_each_layer: bool = arg(False, "Synchronise around each checkpointed layer.", HINT)
    profile_backward: bool = arg(False, "Profile checkpointed layers' backward pass.", HINT)
    partition_activations: bool = arg(
        False, "Partition checkpointed activations across tensor-parallel ranks.", HINT
    )
    torch_compile: bool = arg(
        False,
        "Compile each transformer block and the cross-entropy kernels with torch.compile "
        "(Strata; fuses their elementwise work).",
    )
    hysteresis: int = arg(
        2, "Megatron fp16 loss-scale hysteresis (use the fp16 dict).", DEFAULT_ONLY
    )
    dynamic_loss_scale: bool | None = arg(None, "Whether fp16 loss scaling is dynamic.", DERIVED)
    loss_scale: float | None = arg(
        None, "Megatron static loss scale (use the fp16 dict).", DEFAULT_ONLY
    )
    loss_scale_window: float = arg(
        1000.0, "Megatron loss-scale window (use the fp16 dict).", DEFAULT_ONLY
    )
    min_scale: float = arg(1.0, "Megatron minimum loss scale (use the fp16 dict).", DEFAULT_ONLY)
    char_level_ppl: bool = arg(False, "Also report character-level perplexity.", DEFAULT_ONLY)
    use_mup: bool = arg(
        False, "Maximal Update Parametrization, relative to a model of width mup_base_width."
    )
    mup_base_width: int | None = arg(
        None, "Hidden size the muP hyperparameters were tuned at (Strata; needed with use_mup)."
    )
    coord_check: bool = arg(
        False, "Run the muP coordinate check (use tools/mup_coord_check.py).", DEFAULT_ONLY
    )
    save_base_shapes: bool = arg(
        False, "Save muP base shapes (Strata uses mup_base_width instead).", DEFAULT_ONLY
    )
    base_shapes_file: str | None = arg(
        None, "muP base shapes file (Strata uses mup_base_width instead).", DEFAULT_ONLY
    )
    mup_init_scale: float = arg(1.0, "muP initialisation scale (with use_mup).")
    mup_attn_temp: float = arg(1.0, "muP attention temperature (with use_mup).")
    mup_output_temp: float = arg(1.0, "muP output logits multiplier (with use_mup).")
    mup_embedding_mult: float = arg(1.0, "muP embedding multiplier (with use_mup).")
    mup_rp_embedding_mult: float = arg(
        1.0, "muP relative-position multiplier (with use_mup).", gate="pos_emb: rpe"
    )
    mup_width_scale: int = arg(
        2, "muP delta-model width scale for save_base_shapes (not used by Strata).", DEFAULT_ONLY
    )
    eod_mask_loss: bool = arg(False, "Exclude end-of-document tokens from the loss.")
    reset_position_ids: bool = arg(False, "Restart position ids after each end-of-document token.")
    reset_attention_mask: bool = arg(False, "Do not attend across end-of-document tokens.")
