"""The optimizer step, opened up: per-tower gradient norms and a guard against non-finite values.

megatron's `optimizer.step()` is prepare grads -> norm -> clip -> update. We run the same four
parts ourselves (all public methods of megatron's optimizers) for two reasons:

* the norm is computed per tower (the param groups carry a "tower" tag, see train/optim.py), so
  a log shows which tower's gradients blow up; the total is the root of the towers' squares;
* with bf16/fp32 megatron has no grad scaler, so a NaN/Inf gradient would go straight into the
  weights; here a non-finite norm skips the update instead, and the trainer counts it.

Frozen towers get LR 0 on their groups (no update, no weight decay): `set_frozen`.
"""

import math
from dataclasses import dataclass, field

import torch
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _groups(optimizer):
    for opt in _optimizers(optimizer):
        for group in opt.optimizer.param_groups if opt.optimizer is not None else ():
            yield opt, group


def set_frozen(optimizer, frozen: set) -> None:
    """After the LR schedule has set this step's LRs: zero them for frozen towers' groups."""
    for _, group in _groups(optimizer):
        if group.get("tower") in frozen:
            group["lr"] = 0.0


# Group settings the trainer owns: megatron matches a checkpoint's param groups to the live
# ones by (max_lr, min_lr, lr_mult, wd_mult, ...), then overwrites the live settings with the
# saved ones. So a resume with a changed LR would not find its groups, and two towers with equal
# multipliers are indistinguishable (their "tower" tags can swap).
OWNED = ("tower", "max_lr", "min_lr", "lr_mult")


def group_settings(optimizer) -> list[dict]:
    return [{k: group[k] for k in OWNED if k in group} for _, group in _groups(optimizer)]


def set_group_settings(optimizer, settings: list[dict]) -> None:
    for (_, group), values in zip(_groups(optimizer), settings):
        group.update(values)


def saved_group_settings(optimizer, optim_cfg: dict, tower_mults: dict) -> list[dict]:
    """The settings the live groups had when a checkpoint was written with `optim_cfg` (the
    saved config's optimizer section) and per-tower LR multipliers `tower_mults`."""
    out = []
    for values in group_settings(optimizer):
        out.append({**values, "max_lr": optim_cfg["lr"], "min_lr": optim_cfg["min_lr"],
                    "lr_mult": tower_mults.get(values.get("tower"), values.get("lr_mult", 1.0))})
    return out


@dataclass
class StepResult:
    applied: bool
    grad_norm: float
    tower_norms: dict = field(default_factory=dict)


@torch.no_grad()
def tower_grad_norms(optimizer, towers: list[str]) -> dict[str, float]:
    """L2 norm of each tower's (reduced, unclipped) gradients, identical on every rank.

    Collective over the optimizer's grad-stats group: every rank calls it with the same towers,
    also a rank that holds none of a tower's parameters (its list is simply empty).
    """
    grads = {t: [] for t in towers}
    for _, group in _groups(optimizer):
        tower = group.get("tower", towers[0])
        for p in group["params"]:
            if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                grads[tower].append(p.grad)
    stats_group = _optimizers(optimizer)[0].get_grad_stats_parallel_group()
    return {t: float(get_grad_norm_fp32(grads[t], grad_stats_parallel_group=stats_group)) for t in towers}


def optimizer_step(optimizer, clip_grad: float, towers: list[str]) -> StepResult:
    """prepare -> per-tower norms -> skip if non-finite -> clip -> update."""
    found_inf = optimizer.prepare_grads()
    norms = tower_grad_norms(optimizer, towers)
    total = math.sqrt(sum(n * n for n in norms.values()))
    if found_inf or not math.isfinite(total):
        return StepResult(False, total, norms)
    if clip_grad > 0:
        for opt in _optimizers(optimizer):
            params = [p for p in opt.get_parameters() if p.grad is not None]
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=total)
    return StepResult(bool(optimizer.step_with_ready_grads()), total, norms)
