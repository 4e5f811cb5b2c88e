"""Wrap model chunks in megatron's DDP and build megatron's (distributed) optimizer.

The wrapper owns gradient buffers: gradients accumulate in fp32 `main_grad` buffers, are
reduce-scattered (distributed optimizer) or all-reduced over the data-parallel group after the
last micro-batch, and megatron's `finalize_model_grads` also sums sequence-parallel norm
gradients over the tensor-parallel group.
"""

from functools import partial
from typing import Optional

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.process_groups_config import ProcessGroupCollection

from finevit.config import OptimizerConfig, ParallelConfig


def wrap_ddp(chunks: list, parallel: ParallelConfig, pg: ProcessGroupCollection) -> list:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk, pg_collection=pg,
            # Only the first chunk's buckets may skip bucketing-related overlap: megatron's rule.
            disable_bucketing=i > 0))
    config = chunks[0].config
    config.finalize_model_grads_func = partial(_finalize_grads, pg_collection=pg)
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def _finalize_grads(model: list, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """megatron's finalize_model_grads, after marking the gradients no hook delivered as ready.

    With overlap_grad_reduce a bucket is reduced once every parameter's backward hook has fired,
    and megatron learns the expected set from the first step. A frozen text tower builds no
    graph, so its hooks never fire: the first step's set is short of it (megatron asserts at the
    next step), and after unfreezing the sets differ. Its gradients are zeros in the buffer, as
    without overlap; declaring them ready here keeps the expected set whole in every phase.
    """
    for chunk in model:
        if not chunk.ddp_config.overlap_grad_reduce:
            continue
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            for param in group.params - group.per_param_grad_ready_counts.keys():
                group.register_grad_ready(param, force_all_reduce)
    finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


# Tables and learned queries are looked up, not multiplied: decaying them only shrinks them.
NO_DECAY_NAMES = ("word_embeddings", "position_embeddings", "probe")


def takes_weight_decay(param: torch.Tensor, name: str) -> bool:
    """Only the matrices of linear (and patch-projection) layers decay, as in big_vision's SigLIP:
    not norms, biases, embedding tables, the pooling probe or the loss's temperature and bias."""
    if param.dim() < 2 or name.endswith("bias"):
        return False
    return not any(part in name for part in NO_DECAY_NAMES)


def tower_overrides(optim: OptimizerConfig, towers: dict[str, float]) -> dict:
    """Param-group overrides: one group family per tower (tagged "tower", scaled by its LR
    multiplier) so the trainer can freeze a tower or log its gradient norm from the groups;
    plus no weight decay where `takes_weight_decay` says so."""
    overrides = {}
    if optim.decay_matrices_only:
        no_decay = ParamWithNamePredicate(name="no_decay", fn=lambda p, n: not takes_weight_decay(p, n))
        overrides[ParamKey(with_name_predicate=no_decay)] = {"wd_mult": 0.0}
    for tower, mult in towers.items():
        match = ParamWithNamePredicate(
            name=f"tower_{tower}", fn=lambda p, n, t=tower: getattr(p, "finevit_tower", "vision") == t)
        overrides[ParamKey(with_name_predicate=match)] = {"tower": tower, "lr_mult": mult}
    return overrides


def build_optimizer(ddp_chunks: list, optim: OptimizerConfig, parallel: ParallelConfig,
                    pg: ProcessGroupCollection, dtype: torch.dtype = torch.float32,
                    towers: Optional[dict[str, float]] = None):
    """megatron's optimizer over the chunks; `towers` maps a tower name to its LR multiplier
    (parameters carry their tower in the `finevit_tower` attribute; untagged ones are vision)."""
    config = MegatronOptimizerConfig(
        optimizer=optim.name,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )
    overrides = tower_overrides(optim, towers or {"vision": 1.0})
    return get_megatron_optimizer(config, ddp_chunks, config_overrides=overrides, pg_collection=pg,
                                  use_gloo_process_groups=False)


@torch.no_grad()
def reload_main_params(optimizer, params: list) -> None:
    """Copy these model parameters into their fp32 main copies after changing them in place.

    megatron's `reload_model_params` re-derives every main weight from its bf16 model weight,
    which discards what each main weight holds below bf16 precision; this touches only `params`.
    It walks the (float16 model group, fp32 main group) pairs the way megatron's own reload does.
    """
    targets = {id(p) for p in params}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "shard_fp32_from_float16_groups"):  # distributed optimizer: main shards
            pairs = zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups)
            for model_group, main_group in pairs:
                for model, main in zip(model_group, main_group):
                    if id(model) in targets:
                        span = opt._get_model_param_range_map(model)["param"]
                        main.copy_(model.view(-1)[span.start:span.end])
        elif hasattr(opt, "fp32_from_float16_groups"):  # whole fp32 copies
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for model, main in zip(model_group, main_group):
                    if id(model) in targets:
                        main.copy_(model)
        # fp32 model parameters are their own main weights (or views of them): nothing to copy.
