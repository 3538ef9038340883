"""Bad checkpoints are refused with a message naming the file, the tensor or the field."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit import CheckpointError


@pytest.fixture
def xverse(checkpoints, tmp_path):
    folder = tmp_path / "xv"
    shutil.copytree(checkpoints("xverse")[0], folder)
    return folder


def rewrite_shard(folder, fn):
    shard = folder / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_missing_tensor(xverse):
    rewrite_shard(xverse, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' "
                                              r"\(index lists it in model-00002-of-00002\.safetensors\)"):
        moekit.load(xverse)


def test_unexpected_tensor(xverse):
    rewrite_shard(xverse, lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: unexpected tensor "
                                              r"'model\.layers\.1\.mlp\.experts\.8\.up_proj\.weight'"):
        moekit.load(xverse)


def test_misshaped_tensor(xverse):
    rewrite_shard(xverse, lambda t: t.update({"model.layers.1.mlp.router.weight": torch.zeros(7, 64)}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: tensor "
                                              r"'model\.layers\.1\.mlp\.router\.weight' has shape \[7, 64\], "
                                              r"config\.json implies \[8, 64\]"):
        moekit.load(xverse)


@pytest.mark.parametrize("change, message", [
    ({"moe_top_k": 9}, r"config\.json: config field top_k=9 is out of range: must be in 1\.\.num_experts=8"),
    ({"num_attention_heads": 5}, r"config\.json: config.json field 'hidden_size'=64 is not divisible by "
                                 r"num_attention_heads=5"),
    ({"hidden_size": None}, r"config\.json: config\.json field 'hidden_size' is missing"),
    ({"hidden_act": "gelu"}, r"'hidden_act'='gelu' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, r"'rope_scaling' type 'yarn' is not supported"),
    ({"model_type": "bert", "architectures": ["BertModel"]}, r"model_type='bert'.*is not a family moekit reads"),
    # absurd or zero sizes are refused before anything is allocated
    ({"num_attention_heads": 0}, r"config\.json: config\.json field 'num_attention_heads'=0 must be a positive"),
    ({"vocab_size": 10**12}, r"config\.json: its sizes \(vocab_size=1000000000000, hidden_size=64, 2 layers\) make "
                             r"128,000,[\d,]+ parameters, but the weight files hold only [\d,]+ bytes"),
    ({"vocab_size": 1e12}, r"vocab_size=1000000000000\.0 is out of range: must be a positive integer"),
    ({"rope_theta": "fast"}, r"config\.json: a field has the wrong type \(could not convert string to float: 'fast'\)"),
])
def test_config_out_of_range(xverse, change, message):
    cfg = json.loads((xverse / "config.json").read_text())
    cfg.update(change)
    (xverse / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        moekit.load(xverse)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_malicious_pickle_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "orion"
    shutil.copytree(checkpoints("orion")[0], folder)
    Evil.marker = tmp_path / "pwned"
    shard = folder / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.embed_tokens.weight"] = Evil()
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=r"pytorch_model-00001-of-00002\.bin: refused to unpickle"):
        moekit.load(folder)
    assert not Evil.marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").unlink(), r"config\.json: file not found"),
    (lambda f: (f / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
    (lambda f: (f / "model-00002-of-00002.safetensors").unlink(),
     r"lists shard model-00002-of-00002\.safetensors, which is missing"),
    (lambda f: (f / "model-00001-of-00002.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"),
     r"model-00001-of-00002\.safetensors: not a readable safetensors file"),
    (lambda f: [p.unlink() for p in f.glob("model*")], r"no weights found"),
])
def test_damaged_folder(xverse, damage, message):
    damage(xverse)
    with pytest.raises(CheckpointError, match=message):
        moekit.load(xverse)


def test_truncated_bin_shard(checkpoints, tmp_path):
    folder = tmp_path / "lm"
    shutil.copytree(checkpoints("llama_moe")[0], folder)
    shard = folder / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin: not a readable PyTorch checkpoint"):
        moekit.load(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        moekit.load(tmp_path / "nope")


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/model.safetensors", ".hidden.safetensors"])
def test_index_naming_a_shard_outside_the_folder_is_refused(xverse, shard):
    index = json.loads((xverse / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (xverse / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"names shard {shard!r}, which is not a file name inside"):
        moekit.load(xverse)
