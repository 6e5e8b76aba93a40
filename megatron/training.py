"""The training loop: setup, train step, evaluation, logging and checkpoint cadence."""

from __future__ import annotations

import os
import time
import traceback
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
from megatron.engine.auto_batch import size_micro_batch_on_device
from megatron.engine.nonfinite import NonFiniteSteps
from megatron.engine.watchdog import collective_failure, step_watchdog
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
from megatron.preemption import Preempted, StopRequest
from megatron.tokenizer import build_tokenizer


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resume continues exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    # Steps not applied (non-finite loss or gradient norm): the LR schedule did not advance.
    skipped_steps: int = 0
    # Rank 0's W&B run: a resumed or requeued job logs to the same run.
    wandb_run_id: str | None = None


def as_floats(metrics: dict) -> dict:
    """Plain numbers for logging. Steps keep their metrics on the device; besides the
    non-finite check (which reads the loss and norm once the optimizer step has waited for the
    norm anyway), reading them here, at log intervals, is the only wait for the accelerator."""
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


class Trainer:
    def __init__(self, args):
        self.args = args
        if starts_fresh(args):
            print_rank_0(f"load: {args.load} holds no checkpoint yet (load = save): starting fresh")
            args.load = None
        if args.load:
            resolve_checkpoint(args.load, args.iteration)  # a bad `load` fails before any setup
        initialize_megatron(args)
        self.device = device()
        self.tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
        if args.train_iters is None:  # the config derives it from train_epochs when set
            raise ConfigError("set train_iters or train_epochs: the run needs a length")
        self.state = TrainState()
        if args.auto_micro_batch and self.device.type == "cuda":
            size_micro_batch_on_device(args, self.device)
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
        self.metrics = MetricsLogger(args, run_file=True, wandb_run_id=self.state.wandb_run_id)
        if self.metrics.enabled and self.metrics.wandb:
            self.state.wandb_run_id = self.metrics.wandb.id
        self.stop_request = StopRequest()
        self.peak_flops = device_peak_flops()
        # Harness tasks on the live model: loaded (and checked) before the first step.
        self.eval_tasks = None
        if args.eval_tasks_interval:
            from megatron.evaluation.tasks import load_tasks

            self.eval_tasks = load_tasks(list(args.eval_tasks), args.eval_include_path)
            self.eval_model = self.engine.module
            if args.pipe_parallel_size >= 2:  # the stage's layers, run forward-only in place
                from megatron.inference.pipeline import PipelinedGPT
                from megatron.model import ModelConfig

                self.eval_model = PipelinedGPT.of_stage(
                    self.engine.module, ModelConfig.from_neox(args)
                )

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

    def train_step(self, train_iter) -> tuple[dict, str | None]:
        """One optimizer step over gradient_accumulation_steps micro-batches: its metrics (device
        tensors; ``as_floats`` reads them) and what was not finite if its update was skipped.
        The data moves on either way; the schedule counts applied steps, as DeepSpeed's does."""
        lr = self.scheduler.step(self.state.iteration + 1 - self.state.skipped_steps)
        self.step.guard.begin()
        try:
            with step_watchdog(self.args.distributed_timeout_minutes * 60):
                metrics = self.step.train(train_iter, self.loss_context)
        except RuntimeError as err:
            failure = collective_failure(err, self.state.iteration + 1)
            if failure is None:
                raise
            traceback.print_exception(err)
            raise failure from err
        self.state.iteration += 1
        self.state.consumed_train_samples += self.global_batch
        problem = self.step.guard.problem(metrics)
        if problem:
            self.state.skipped_steps += 1
        return {**metrics, "lr": lr}, problem

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

        results = evaluate_tasks(self.eval_model, self.tokenizer, self.eval_tasks, self.args)
        if results is not None:
            for record in log_results(self.metrics, results, self.state.iteration):
                print_rank_0(
                    f"iter {record['iteration']:>6} | eval {record['task']} | "
                    f"{record['metric']} {record['value']:.4f}"
                )

    # -- loop ----------------------------------------------------------------------------------

    def _log(self, metrics: dict, eta: float | None = None) -> None:
        tokens = self.state.consumed_train_samples * self.args.seq_length
        # Cumulative training FLOPs from the consumed tokens, so the count survives a resume.
        metrics.update(consumed_tokens=tokens, flops=tokens * flops_per_token(self.args))
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

    def _stop_nonfinite(self, problem: str) -> None:
        """One non-finite step too many in a row: save the last good weights and stop."""
        iteration, limit = self.state.iteration, self.args.skip_nonfinite_steps
        saved = "no checkpoint saved (`save` is not set)"
        if self.saver is not None:
            self._save()
            self.saver.wait()
            saved = (
                f"the weights (untouched by the skipped steps) are saved as "
                f"{self.args.save}/global_step{iteration}"
            )
        self.metrics.close()
        raise NonFiniteSteps(
            f"iteration {iteration}: {problem}; {self.step.guard.consecutive} non-finite "
            f"step(s) in a row, skip_nonfinite_steps is {limit}: stopping; {saved}"
        )

    def _stop_for_preemption(self) -> None:
        """The scheduler asked the job to stop: save where every rank is, and leave."""
        iteration = self.state.iteration
        print_rank_0(f"{self.stop_request.describe()}: stopping after iteration {iteration}")
        if self.saver is not None:
            self._save()
            self.saver.wait()
        self.metrics.finish("stopped")
        raise Preempted(f"stopped after iteration {iteration} on request; requeue to resume")

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
            metrics, problem = self.train_step(train_iter)
            if self.saver is not None:
                self.saver.poll()
            throughput.add(tokens_per_step)
            iteration = self.state.iteration
            if not problem:
                interval_losses.append(metrics["lm_loss"])
            # A skipped step gets a line of its own, with its own (non-finite) loss.
            if problem or iteration % args.log_interval == 0 or iteration == args.train_iters:
                metrics = as_floats(metrics)
                if not problem:
                    metrics["lm_loss"] = float(torch.stack(interval_losses).mean())
                    interval_losses = []
                rate, _ = throughput.report()  # after the read: the steps have finished
                metrics.update(
                    iteration=iteration,
                    split="train",
                    tokens_per_sec=rate,
                    skipped=bool(problem),
                    skipped_steps=self.state.skipped_steps,
                )
                if self.peak_flops:
                    world = dist.get_world_size() if dist.is_initialized() else 1
                    metrics["mfu"] = rate * flops_per_token(args) / (self.peak_flops * world)
                done = iteration - start_iteration
                elapsed = time.perf_counter() - start_time
                self._log(metrics, eta=elapsed / done * (args.train_iters - iteration))
            if self.step.guard.count(problem):
                self._stop_nonfinite(problem)
            if problem:
                print_rank_0(
                    f"iteration {iteration}: {problem}: the update is skipped "
                    f"({self.step.guard.consecutive} of {args.skip_nonfinite_steps} allowed in a row)"
                )
            if args.eval_interval and iteration % args.eval_interval == 0:
                self.evaluate("valid", self.valid_ds, "consumed_valid_samples")
            if self.eval_tasks is not None and iteration % args.eval_tasks_interval == 0:
                self.evaluate_tasks()
            if args.save and iteration in self.save_iters:
                self._save()
                saved_at = iteration
            if self.stop_request.agreed():
                self._stop_for_preemption()
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
        self.metrics.finish("finished" if self.state.iteration >= args.train_iters else "stopped")
        return self.state


def starts_fresh(args) -> bool:
    """GPT-NeoX's setup for jobs that requeue: `load` equal to `save` with nothing saved yet
    means the first start (a `load` elsewhere that is missing stays an error)."""
    if not (args.load and args.save) or args.iteration is not None:
        return False
    same = os.path.realpath(args.load) == os.path.realpath(args.save)
    return same and not os.path.exists(os.path.join(args.load, "latest"))


def pretrain(args) -> TrainState:
    """Train the model `args` describes, from scratch or from `args.load`."""
    print_rank_0(args.derived_table())
    return Trainer(args).train()
