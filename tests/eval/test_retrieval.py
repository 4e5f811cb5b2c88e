"""Recall@k arithmetic: the true partner's rank among all candidates, both directions."""

import pytest
import torch

from finevit.eval import recall_at_k


def test_recall_counts_the_true_partner_among_the_k_best():
    images = torch.eye(3)
    # text 0 matches image 0; text 1 is nearer image 0 than image 1; text 2 matches image 2
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    r = recall_at_k(images, texts, ks=(1, 2))
    # image 1 ranks text 1 first (only text 1 has any weight on axis 1): 3 of 3 hits at 1.
    assert (r["i2t_r1"], r["i2t_r2"]) == (1.0, 1.0)
    # text 1's nearest image is image 0, its partner image 1 comes second.
    assert r["t2i_r1"] == pytest.approx(2 / 3) and r["t2i_r2"] == 1.0
    assert (r["pairs"], r["chance_r1"]) == (3, 1 / 3)
