"""load -> save -> load is bit-exact for every family, and the saved folder is the family's own layout."""

import importlib
import json

import pytest
import torch
from safetensors import safe_open

import moekit
from tests.conftest import CASE_IDS, CASES
from tests.test_families import HF_CLASSES, hf_logits, rel_err


def tensors_of(model):
    return {k: v.detach().clone() for k, v in model.named_views().items()}


@pytest.mark.parametrize("case", CASE_IDS)
def test_round_trip_is_bit_exact(case, checkpoints, tmp_path, input_ids):
    folder, hf, sd = checkpoints(case)
    family = next(c[1] for c in CASES if c[0] == case)
    first = moekit.load(folder)  # the config's own dtype
    out = moekit.save(first, tmp_path / "saved")
    second = moekit.load(out)
    assert second.config == first.config
    a, b = tensors_of(first), tensors_of(second)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    with torch.no_grad():
        assert torch.equal(first(input_ids), second(input_ids))

    # The family's own layout: config.json + safetensors shards + index, same tensor names as the source.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    saved_names = set(index["weight_map"])
    source_names = {n for n in sd if not n.endswith("rotary_emb.inv_freq")}
    assert saved_names == source_names
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["architectures"] == hf["architectures"] and saved_cfg["model_type"] == hf["model_type"]
    stored_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    for file in set(index["weight_map"].values()):
        with safe_open(out / file, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if family != "orion":  # stored in the config's dtype, so saved bytes equal the source's
                    assert stored_dtype[t.dtype] == hf["torch_dtype"]
                    assert torch.equal(t.float(), sd[name]), name
                else:  # Orion ships float16 under a bfloat16 config; moekit loads (and saves) bfloat16
                    assert t.dtype == torch.bfloat16


@pytest.mark.parametrize("case", [c for c in CASE_IDS if next(x[1] for x in CASES if x[0] == c) in HF_CLASSES])
def test_saved_checkpoint_reads_in_transformers(case, checkpoints, tmp_path, input_ids):
    folder, hf, sd = checkpoints(case)
    family = next(c[1] for c in CASES if c[0] == case)
    model = moekit.load(folder, dtype=torch.float32)
    out = moekit.save(model, tmp_path / "saved")
    with torch.no_grad():
        assert rel_err(hf_logits(family, out, input_ids), model(input_ids)) < 1e-5


def test_save_keeps_tokenizer_files_and_replaces_weights(checkpoints, tmp_path):
    folder, hf, sd = checkpoints("xverse")
    model = moekit.load(folder)
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (target / "model-00001-of-00009.safetensors").write_text("stale")
    moekit.save(model, target)
    names = {p.name for p in target.iterdir()}
    assert names == {"config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors",
                     "tokenizer.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_failed_save_leaves_target_untouched(checkpoints, tmp_path, monkeypatch):
    folder, hf, sd = checkpoints("mixtral")
    model = moekit.load(folder)
    target = tmp_path / "ckpt"
    moekit.save(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(importlib.import_module("moekit.weights.save"), "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        moekit.save(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_in_another_layout(checkpoints, tmp_path, input_ids):
    """A Mixtral-shaped model can be written in Orion's layout (and reads back identically)."""
    folder, hf, sd = checkpoints("mixtral")
    model = moekit.load(folder, dtype=torch.float32)
    out = moekit.save(model, tmp_path / "as-orion", family="orion")
    assert json.loads((out / "config.json").read_text())["model_type"] == "orion_moe"
    again = moekit.load(out)
    assert again.config.family == "orion" and again.config.norm == "rms"
    with torch.no_grad():
        assert torch.equal(again(input_ids), model(input_ids))
