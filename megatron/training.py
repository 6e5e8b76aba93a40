"""The training loop: setup, train step, evaluation, logging and checkpoint cadence."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.checkpoint import resolve_checkpoint
from megatron.checkpoint.load import load_checkpoint
from megatron.checkpoint.save import CheckpointSaver
from megatron.data.data_utils import (
    build_train_valid_test_datasets,
    describe_dataset,
    make_data_loader,
)
from megatron.engine import build_step
from megatron.initialize import device, initialize_megatron
from megatron.logging import (
    MetricsLogger,
    Throughput,
    console_line,
    device_peak_flops,
    flops_per_token,
    print_rank_0,
)
from megatron.losses import (
    REFERENCE_FILE,
    LossContext,
    build_reference_model,
    load_reference_model,
    save_reference_model,
)
from megatron.neox_arguments import ConfigError
from megatron.tokenizer import build_tokenizer


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resume continues exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


def as_floats(metrics: dict) -> dict:
    """Plain numbers for logging. Steps keep their metrics on the device so the host never waits
    for the accelerator between steps; reading them here, at log intervals, is the one sync."""
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


class Trainer:
    def __init__(self, args):
        self.args = args
        if args.load:
            resolve_checkpoint(args.load, args.iteration)  # a bad `load` fails before any setup
        initialize_megatron(args)
        self.device = device()
        self.tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
        if args.train_iters is None:  # the config derives it from train_epochs when set
            raise ConfigError("set train_iters or train_epochs: the run needs a length")
        self.state = TrainState()
        # The model, optimizer and engine, and how a step runs on that engine.
        self.step = build_step(args, self.device)
        self.engine, self.optimizer, self.scheduler = (
            self.step.engine,
            self.step.optimizer,
            self.step.scheduler,
        )
        if args.load:
            self._load()
        # DPO/KTO compare against the starting weights.
        reference = None
        if self.step.objective.needs_reference(args):
            reference = build_reference_model(self.engine.module)
            if args.load and not args.finetune and not load_reference_model(reference, args.load):
                print_rank_0(
                    f"{args.load} holds no {REFERENCE_FILE}: the reference model is "
                    "the resumed weights"
                )
        self.loss_context = LossContext(args, self.tokenizer.eod, reference)
        self._reference_saved = False
        self.global_batch = args.train_batch_size
        self.dp_rank = mpu.get_data_parallel_rank()
        self.dp_size = mpu.get_data_parallel_world_size()
        self.train_ds, self.valid_ds, self.test_ds = self._build_datasets()
        self.save_iters = set(args.save_iters or ())
        self.saver = CheckpointSaver(args) if args.save else None
        self.metrics = MetricsLogger(args)
        self.peak_flops = device_peak_flops()
        # Harness tasks on the live model: loaded (and checked) before the first step.
        self.eval_tasks = None
        if args.eval_tasks_interval:
            from megatron.evaluation.tasks import load_tasks

            self.eval_tasks = load_tasks(list(args.eval_tasks), args.eval_include_path)

    # -- setup ---------------------------------------------------------------------------------

    def _load(self) -> None:
        args = self.args
        load_optimizer = not (args.finetune or args.no_load_optim)
        metadata = load_checkpoint(
            args,
            self.engine.module,
            self.optimizer,
            self.scheduler,
            load_optimizer=load_optimizer,
            load_rng=not (args.finetune or args.no_load_rng),
        )
        if not args.finetune:
            self.state = TrainState(**metadata["train_state"])
        print_rank_0(
            f"loaded checkpoint {args.load} at iteration {metadata['iteration']}"
            + (" (weights only: finetune)" if args.finetune else "")
        )

    def _build_datasets(self):
        args = self.args
        evals = args.train_iters // args.eval_interval + 1 if args.eval_interval else 0
        num_samples = (
            args.train_iters * self.global_batch,
            evals * args.eval_iters * self.global_batch,
            args.eval_iters * self.global_batch,
        )
        datasets = build_train_valid_test_datasets(args, num_samples)
        for split, dataset in zip(("train", "valid", "test"), datasets):
            print_rank_0(describe_dataset(split, dataset))
        return datasets

    def _loader(self, dataset, consumed: int):
        if dataset is None:
            return None
        batches = iter(
            make_data_loader(
                dataset,
                consumed,
                self.args.train_micro_batch_size_per_gpu,
                self.dp_rank,
                self.dp_size,
                self.args.num_workers,
            )
        )
        return self.step.batches(batches, self.loss_context)

    # -- steps ---------------------------------------------------------------------------------

    def train_step(self, train_iter) -> dict:
        """One optimizer step over gradient_accumulation_steps micro-batches; the metrics stay
        device tensors (``as_floats`` reads them)."""
        lr = self.scheduler.step(self.state.iteration + 1)
        metrics = self.step.train(train_iter, self.loss_context)
        self.state.iteration += 1
        self.state.consumed_train_samples += self.global_batch
        return {**metrics, "lr": lr}

    def evaluate(self, split: str, dataset, consumed_attr: str | None) -> float | None:
        consumed = getattr(self.state, consumed_attr) if consumed_attr else 0
        data_iter = self._loader(dataset, consumed)
        if data_iter is None:
            return None
        losses = self.step.eval_losses(data_iter, self.loss_context, self.args.eval_iters)
        if consumed_attr:
            setattr(self.state, consumed_attr, consumed + self.args.eval_iters * self.global_batch)
        metrics = as_floats(losses)
        self._log({"iteration": self.state.iteration, "split": split, **metrics})
        return metrics["lm_loss"]

    def evaluate_tasks(self) -> None:
        """The harness's tasks on the live model, logged with the iteration."""
        from megatron.evaluation.harness import evaluate_tasks, log_results

        results = evaluate_tasks(self.engine.module, self.tokenizer, self.eval_tasks, self.args)
        if results is not None:
            for record in log_results(self.metrics, results, self.state.iteration):
                print_rank_0(
                    f"iter {record['iteration']:>6} | eval {record['task']} | "
                    f"{record['metric']} {record['value']:.4f}"
                )

    # -- loop ----------------------------------------------------------------------------------

    def _log(self, metrics: dict, eta: float | None = None) -> None:
        metrics["consumed_tokens"] = self.state.consumed_train_samples * self.args.seq_length
        self.metrics.log(metrics)
        print_rank_0(console_line(metrics, self.args.train_iters, eta))

    def _save(self) -> None:
        if self.loss_context.reference is not None and not self._reference_saved:
            save_reference_model(self.loss_context.reference, self.args.save)
            self._reference_saved = True
        folder = self.saver.save(
            self.state.iteration,
            self.engine.module,
            self.optimizer,
            self.scheduler,
            asdict(self.state),
        )
        print_rank_0(f"{'writing' if self.saver.asynchronous else 'saved'} checkpoint {folder}")

    def train(self) -> TrainState:
        args = self.args
        if self.state.iteration == 0 and args.eval_interval:
            self.evaluate("valid", self.valid_ds, "consumed_valid_samples")
        train_iter = self._loader(self.train_ds, self.state.consumed_train_samples)
        if train_iter is None:
            raise ValueError("no training data: set data_path or train_data_paths")
        throughput, interval_losses = Throughput(), []
        start_iteration, start_time = self.state.iteration, time.perf_counter()
        tokens_per_step = self.global_batch * args.seq_length
        saved_at = None
        while self.state.iteration < args.train_iters:
            metrics = self.train_step(train_iter)
            if self.saver is not None:
                self.saver.poll()
            throughput.add(tokens_per_step)
            interval_losses.append(metrics["lm_loss"])
            iteration = self.state.iteration
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                metrics = as_floats(metrics)
                interval_loss = float(torch.stack(interval_losses).mean())
                rate, _ = throughput.report()  # after the read: the steps have finished
                metrics.update(
                    iteration=iteration,
                    split="train",
                    lm_loss=interval_loss,
                    tokens_per_sec=rate,
                )
                interval_losses = []
                if self.peak_flops:
                    world = dist.get_world_size() if dist.is_initialized() else 1
                    metrics["mfu"] = rate * flops_per_token(args) / (self.peak_flops * world)
                done = iteration - start_iteration
                elapsed = time.perf_counter() - start_time
                self._log(metrics, eta=elapsed / done * (args.train_iters - iteration))
            if args.eval_interval and iteration % args.eval_interval == 0:
                self.evaluate("valid", self.valid_ds, "consumed_valid_samples")
            if self.eval_tasks is not None and iteration % args.eval_tasks_interval == 0:
                self.evaluate_tasks()
            if args.save and iteration in self.save_iters:
                self._save()
                saved_at = iteration
            if args.exit_interval and iteration % args.exit_interval == 0:
                print_rank_0(f"exit_interval: stopping at iteration {iteration}")
                break
        else:
            if args.eval_interval and self.state.iteration % args.eval_interval != 0:
                self.evaluate("valid", self.valid_ds, "consumed_valid_samples")
            if args.eval_iters:
                self.evaluate("test", self.test_ds, None)
            if self.eval_tasks is not None and self.state.iteration % args.eval_tasks_interval:
                self.evaluate_tasks()
        if args.save and saved_at != self.state.iteration:
            self._save()
        if self.saver is not None:
            self.saver.wait()
        self.metrics.close()
        return self.state


def pretrain(args) -> TrainState:
    """Train the model `args` describes, from scratch or from `args.load`."""
    print_rank_0(args.derived_table())
    return Trainer(args).train()
