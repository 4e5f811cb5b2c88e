"""model.llm.init_from: a Hugging Face Qwen2 / Qwen3 directory (sharded or not) is read exactly;
a directory of another shape or architecture is refused in one sentence naming what differs."""

import dataclasses
import re

import pytest
import torch

from finevit.convert import qwen2 as conv
from finevit.convert.qwen2_5_vl import ConversionError

from tiny_llm import CASES, hf_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random Qwen3 saved in shards of ~20 kB (several safetensors files + an index)."""
    llm = CASES["qwen3"]
    hf = hf_model(llm)
    path = tmp_path_factory.mktemp("hf") / "qwen3"
    hf.save_pretrained(path, max_shard_size="20KB")
    return llm, hf, path


def test_a_sharded_directory_reads_back_every_tensor(saved):
    llm, hf, path = saved
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    conv.check_hf_llm_dir(str(path), llm)
    state = conv.read_hf_llm_dir(str(path))
    assert state.keys() == hf.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in hf.state_dict().items())


def test_another_shape_or_architecture_is_one_sentence(saved, tmp_path):
    llm, _, path = saved
    other = dataclasses.replace(llm, num_layers=3, num_kv_heads=4, family="qwen2")
    with pytest.raises(ConversionError, match=re.escape(
            f"model.llm does not match the LLM in {path}: family qwen2 here, qwen3 there; num_layers 3 here, "
            "2 there; num_kv_heads 4 here, 2 there.")):
        conv.check_hf_llm_dir(str(path), other)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    with pytest.raises(ConversionError, match=r"holds LlamaForCausalLM, not a Qwen2 / Qwen2.5 / Qwen3 causal LM"):
        conv.check_hf_llm_dir(str(tmp_path / "llama"), llm)
    with pytest.raises(ConversionError, match=r"has no config.json"):
        conv.check_hf_llm_dir(str(tmp_path), llm)
