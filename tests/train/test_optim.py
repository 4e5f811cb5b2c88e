"""Parameter groups of the stage-1 optimizer: which parameters decay, which tower each is in."""

import pytest

from finevit.train.optim import takes_weight_decay
from finevit.train.stage1 import Stage1Task
from finevit.train.trainer import Trainer

from tiny_stage1 import tiny_config


@pytest.fixture
def trainer(dist, stage1_corpus, tmp_path):
    corpus, tokenizer = stage1_corpus
    cfg = tiny_config(corpus, tokenizer, tmp_path / "run", **{"optimizer.weight_decay": 0.1})
    t = Trainer(cfg, Stage1Task(cfg)).setup()
    t.scheduler.apply(0, 1)  # sets each group's weight_decay from its wd_mult
    yield t
    t.close()


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
