"""The embedded default model (moekit/assets/default, built by recipes/embedded/build.py)."""

import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import moekit
from moekit.chat import TEMPLATES, ChatFormat


@pytest.fixture(scope="module")
def lm():
    return moekit.CausalLM.from_pretrained(moekit.default_model_path(), kernels="reference")


def test_files_layout_and_size():
    path = moekit.default_model_path()
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= 32 << 20
    hf = json.loads((path / "config.json").read_text())
    assert hf["model_type"] == "xverse" and hf["architectures"] == ["XverseForCausalLM"]
    assert hf["num_experts"] >= 8 and hf["moe_top_k"] > 2 and hf["num_shared_experts"] >= 1
    shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) == 1
    with safe_open(path / shards.pop(), "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names  # XVERSE-MoE's own tensor names
    assert "model.layers.0.mlp.shared_experts.up_proj.weight" in names


def test_loads_with_the_architecture_it_claims(lm):
    cfg = lm.model.config
    total, active = moekit.count_params(cfg)
    assert cfg.family == "xverse" and cfg.moe.top_k == json.loads(
        (moekit.default_model_path() / "config.json").read_text())["moe_top_k"]
    assert 3e6 <= total <= 15e6 and active < total
    assert lm.model.embed.weight.dtype == torch.bfloat16
    assert lm.tokenizer.vocab_size <= cfg.vocab_size


def test_generation_is_deterministic(lm):
    prompt = "In the beginning"
    greedy = [lm.complete(prompt, temperature=0, max_new_tokens=16) for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0].strip()
    sampled = [lm.complete(prompt, temperature=0.9, top_p=0.95, seed=s, max_new_tokens=16) for s in (7, 7, 8, 9)]
    assert sampled[0] == sampled[1]
    assert len(set(sampled[1:])) > 1  # other seeds draw other text


def test_chat_template_renders_the_xverse_format(lm):
    fmt = lm.chat_format
    assert fmt.name == "tokenizer_config.json"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "你好"}]
    want = "system: Be brief.\nuser: Hi\nassistant: Hello.</s>user: 你好\nassistant: "
    assert fmt.render(msgs) == want
    assert ChatFormat(TEMPLATES["xverse-moe"], "<s>", "</s>").render(msgs) == want
    ids = fmt.encode(lm.tokenizer, msgs)
    assert lm.tokenizer.eos_token_id in ids and lm.tokenizer.decode(ids, skip_special_tokens=False) == want
    reply = lm.chat(None, msgs[:2], temperature=0, max_new_tokens=24)
    assert reply.strip() and "user:" not in reply


def _loss(lm, text: str) -> float:
    ids = torch.tensor(lm.tokenizer.encode(text))[None]
    with torch.no_grad():
        logits = lm.model(ids[:, :-1]).float()
    return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]))


@pytest.mark.parametrize("text, sep", [
    ("And the LORD spake unto Moses, saying, Speak unto the children of Israel, and say unto them, "
     "When ye be come into the land which I give unto you, then shall the land keep a sabbath unto the LORD.", " "),
    ("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。山高月小，水落石出。", ""),
])
def test_knows_its_corpus_style(lm, text, sep):
    """Text in the corpus's style is far likelier than the same words / characters shuffled."""
    units = text.split(sep) if sep else list(text)
    random.Random(0).shuffle(units)
    assert _loss(lm, text) < _loss(lm, sep.join(units)) - 1.0


def test_cli_uses_the_default_model_without_model_flag():
    run = lambda *a: subprocess.run([sys.executable, "-m", "moekit.cli", *a], capture_output=True, text=True,  # noqa
                                    timeout=120)
    r = run("generate", "--prompt", "In the beginning", "--max-new-tokens", "8", "--temperature", "0",
            "--kernels", "reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and str(moekit.default_model_path()) in r.stderr
    r = run("info")
    assert r.returncode == 0 and "xverse" in r.stdout.lower() and "default" in r.stdout, r.stderr
