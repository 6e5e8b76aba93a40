"""Each parameter's fp32 master and optimizer states, whatever wrapper DeepSpeed put around the
optimizer: ZeRO 1/2 and the bf16 optimizer (flat fragments, ``_hp_mapping``), ZeRO-3
(partitions), an fp16 wrapper's fp32 copies, or none."""

from __future__ import annotations

import torch

from megatron.checkpoint.parameters import data_parallel_share, is_zero3, zero3_partition

MASTER = "master"


class OptimizerView:
    """Flat fragments of each parameter's master and optimizer states (``fragment``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
        self.wrapper = optimizer
        self.base = getattr(optimizer, "optimizer", optimizer)
        self.partitioned = any(hasattr(p, "_hp_mapping") or is_zero3(p) for p in params)
        self.master_of: dict[torch.nn.Parameter, torch.Tensor] = {}
        if not self.partitioned:
            lp_groups = getattr(optimizer, "fp16_groups", None)
            hp_groups = getattr(optimizer, "fp32_groups", None)
            if lp_groups is not None and hp_groups is not None:
                for lp_group, hp_group in zip(lp_groups, hp_groups):
                    self.master_of.update(zip(lp_group, hp_group))
            for p in params:
                self.master_of.setdefault(p, p)
        self._link_state_fragments()

    def _link_state_fragments(self) -> None:
        # DeepSpeed links each parameter's view into the flat optimizer state once, right after
        # the first param group's first step, so groups stepped later are never linked; relink.
        if (
            self.partitioned
            and self.base.state
            and hasattr(self.wrapper, "_hp_optimizer_states_linked")
        ):
            self.wrapper._hp_optimizer_states_linked = False
            self.wrapper._lazy_init_hp_params_optimizer_state()

    def state_keys(self, p: torch.nn.Parameter | None = None) -> list[str]:
        """The names of the parameter-shaped states of ``p`` (None: of any parameter). They
        differ between parameters under optimizers with several rules (Muon's matrices hold
        ``momentum_buffer``, its AdamW parameters ``exp_avg`` and ``exp_avg_sq``)."""
        if p is None or self.partitioned:
            states = list(self.base.state.values())
        else:
            states = [self.base.state.get(self.master_of[p], {})]
        keys = {k for state in states for k, v in state.items() if torch.is_tensor(v) and v.ndim}
        if p is not None and not self.partitioned:
            odd = [k for k in keys if states[0][k].shape != self.master_of[p].shape]
            if odd:
                raise ValueError(
                    f"optimizer state {odd} of a {tuple(p.shape)} parameter is not shaped like "
                    "it (a factored state, e.g. Adafactor's): the layout-free checkpoint format "
                    "stores parameter-shaped states only"
                )
        return sorted(keys)

    def fragment(
        self, p: torch.nn.Parameter, key: str, share_replicas: bool = True
    ) -> tuple[int, torch.Tensor] | None:
        """(start, flat values) of the master ("master") or optimizer state `key` of `p`'s
        tensor-parallel slice that this rank holds; None when another data-parallel rank holds
        all of it. A state every data-parallel rank holds (no ZeRO) is shared out over them
        (``share_replicas``: each writes a distinct range) or returned whole (what a load sets)."""
        state_key = None if key == MASTER else key
        if is_zero3(p):
            return zero3_partition(p, p._z3_optimizer.get_local_fp32_param(p, state_key))
        if self.partitioned:
            mapping = p._hp_mapping
            if mapping is None:
                return None
            values = mapping.get_hp_fragment(state_key)
            return mapping.lp_fragment_address.start, values.reshape(-1)
        master = self.master_of[p]
        values = (master if key == MASTER else self.base.state[master][key]).detach().reshape(-1)
        if not share_replicas:
            return 0, values
        start, end = data_parallel_share(values.numel())
        return start, values[start:end]

    def get_step(self) -> int:
        for state in self.base.state.values():
            step = state.get("step", 0)
            return int(step.item() if torch.is_tensor(step) else step)
        return 0

    def set_step(self, step: int) -> None:
        for state in self.base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"].fill_(step)
            elif "step" in state:
                state["step"] = step

    def materialize(self) -> None:
        """Create the optimizer state (lazily made on the first step) without changing weights:
        one step with zero gradients at learning rate 0."""
        if not self.base.state:
            groups = self.base.param_groups
            saved = [(group["params"], group["lr"]) for group in groups]
            step_params = self._step_params()
            for group, params in zip(groups, step_params):
                group["params"], group["lr"] = params, 0.0
            params = [p for group_params in step_params for p in group_params]
            saved_grads = [p.grad for p in params]
            for p in params:
                p.grad = torch.zeros_like(p)
            self.base.step()
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            for group, (group_params, lr) in zip(groups, saved):
                group["params"], group["lr"] = group_params, lr
        self._link_state_fragments()

    def _step_params(self) -> list[list[torch.Tensor]]:
        """Per param group of the base optimizer, the tensors a step updates. ZeRO-3 hands it
        each sub-group's flat fp32 partition only for the duration of that sub-group's step."""
        flats = getattr(self.wrapper, "fp32_partitioned_groups_flat", None)
        if flats is None:
            return [list(group["params"]) for group in self.base.param_groups]
        per_group: list[list[torch.Tensor]] = [[] for _ in self.base.param_groups]
        for sub_group, flat in enumerate(flats):
            per_group[self.wrapper.sub_group_to_group_id[sub_group]].append(flat)
        return per_group
