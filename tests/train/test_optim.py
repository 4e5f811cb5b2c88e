"""Parameter groups of the stage-1 optimizer: which parameters decay, which tower each is in."""

import pytest
import torch

from finevit.train.optim import takes_weight_decay
from finevit.train.stage1 import Stage1Task
from finevit.train.trainer import Trainer

from tiny_stage1 import tiny_config


@pytest.fixture
def make_trainer(dist, stage1_corpus, tmp_path):
    corpus, tokenizer = stage1_corpus
    made = []

    def make(**extra):
        cfg = tiny_config(corpus, tokenizer, tmp_path / f"run{len(made)}", **extra)
        made.append(Trainer(cfg, Stage1Task(cfg)).setup())
        return made[-1]
    yield make
    for t in made:
        t.close()


@pytest.fixture
def trainer(make_trainer):
    t = make_trainer(**{"optimizer.weight_decay": 0.1})
    t.scheduler.apply(0, 1)  # sets each group's weight_decay from its wd_mult
    return t


def main_weights(optimizer) -> list:
    return [p for opt in optimizer.chained_optimizers for g in opt.optimizer.param_groups for p in g["params"]]


@pytest.mark.parametrize("distributed", [True, False], ids=["distributed_optimizer", "optimizer"])
def test_stretching_text_positions_in_bf16_reloads_only_that_tables_main_weights(make_trainer, distributed):
    trainer = make_trainer(**{"precision.dtype": "bf16", "parallel.distributed_optimizer": distributed})
    for _ in range(2):  # fp32 main weights drift below bf16 precision
        trainer.train_step()
    before = [p.detach().clone() for p in main_weights(trainer.optimizer)]
    trainer._enter_phase(1)  # 32 -> 64 text positions
    table = trainer.chunks[-1].text.position_embeddings.weight
    changed = [(b, p) for b, p in zip(before, main_weights(trainer.optimizer)) if not torch.equal(b, p)]
    assert sum(p.numel() for _, p in changed) == table.numel()  # the table's main weight(s) only
    assert torch.equal(torch.cat([p.view(-1) for _, p in changed]).bfloat16(), table.detach().view(-1))


def test_only_linear_matrices_take_weight_decay(trainer):
    params = {n.removeprefix("module."): p for c in trainer.ddp for n, p in c.named_parameters()}
    decays = {n for n, p in params.items() if takes_weight_decay(p, n)}
    for name in ("loss.logit_scale", "loss.logit_bias", "text.word_embeddings.weight",
                 "text.position_embeddings.weight", "head.pool.probe", "head.pool.attention.in_proj_bias",
                 "text.decoder.final_layernorm.weight", "head.proj.bias"):
        assert name in params and name not in decays, name
    for name in ("head.pool.attention.in_proj_weight", "head.proj.weight", "text.head.weight",
                 "text.decoder.layers.0.mlp.linear_fc1.weight", "vision.decoder.layers.0.mlp.linear_fc2.weight"):
        assert name in decays, name
    # megatron's groups follow the rule: the decayed groups hold exactly the decayed parameters
    # (one rank: the distributed optimizer's shards are whole).
    decayed_numel = {True: 0, False: 0}
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in opt.optimizer.param_groups:
            decayed_numel[group["weight_decay"] > 0] += sum(p.numel() for p in group["params"])
    assert decayed_numel[True] == sum(params[n].numel() for n in decays)
    assert decayed_numel[False] == sum(p.numel() for n, p in params.items() if n not in decays)
