"""Whole models on the C++ CPU backend agree with the reference backend, for every family."""

import pytest
import torch

import moekit
from moekit.engine import KVCache
from moekit.kernels import cpu
from tests.conftest import CASE_IDS

pytestmark = pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need an x86-64 CPU with AVX-512")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def cached_logits(model, ids, steps=3):
    """Prefill, then decode ``steps`` tokens one at a time through the KV cache (greedy)."""
    cache = KVCache(model.config, ids.shape[0], ids.shape[1] + steps, model.embed.weight.dtype)
    out = [model(ids, cache=cache)]
    tok = out[-1][:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        out.append(model(tok, cache=cache))
        tok = out[-1][:, -1].argmax(-1, keepdim=True)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", CASE_IDS)
def test_cpu_backend_matches_reference(case, checkpoints):
    folder = checkpoints(case)[0]
    fast = moekit.load(folder, dtype=torch.float32, kernels="cpu")
    ref = moekit.load(folder, dtype=torch.float32, kernels="reference")
    assert fast.kernels.name == "cpu" and ref.kernels.name == "reference"
    ids = torch.randint(0, fast.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert rel(fast(ids), ref(ids)) < 1e-4
        assert rel(cached_logits(fast, ids), cached_logits(ref, ids)) < 1e-4


@pytest.mark.parametrize("case", ["xverse", "qwen2_moe", "llama_moe-uneven"])
def test_cpu_backend_bfloat16(case, checkpoints):
    """bf16 on the fast path stays as close to a float64 run as transformers-style bf16 math does."""
    folder = checkpoints(case)[0]
    exact = moekit.load(folder, dtype=torch.float64)
    ids = torch.randint(0, exact.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = exact(ids)
        fast = rel(moekit.load(folder, dtype=torch.bfloat16, kernels="cpu")(ids), want)
        ref = rel(moekit.load(folder, dtype=torch.bfloat16, kernels="reference")(ids), want)
    assert fast < max(2 * ref, 0.02)


def test_backend_choice_is_made_once_and_explained(monkeypatch):
    from moekit.kernels import AUTO_MIN_PARAMS, get_backend

    big = 2 * AUTO_MIN_PARAMS
    fast = get_backend("auto", big, "cpu", torch.bfloat16)
    assert fast.name == "cpu" and "avx512f" in fast.reason and "experts" in fast.paths
    half = get_backend("auto", big, "cpu", torch.float16)
    assert half.name == "reference" and "float16 weights" in half.reason
    with pytest.raises(ValueError, match="'cpu' cannot run here: float16 weights"):
        get_backend("cpu", big, "cpu", torch.float16)
    small = get_backend("auto", 1000, "cpu", torch.float32)
    assert small.name == "reference" and "under 50M parameters" in small.reason
    monkeypatch.setenv("MOEKIT_CPU_GEMM", "aten")
    assert "ATen GEMMs" in get_backend("cpu", big, "cpu", torch.bfloat16).paths["experts"]


def test_load_defaults_to_the_fast_path_and_logs_it(checkpoints, monkeypatch, caplog):
    import logging

    from moekit import kernels

    monkeypatch.setattr(kernels, "AUTO_MIN_PARAMS", 0)  # the test checkpoints are tiny
    with caplog.at_level(logging.INFO, logger="moekit"):
        model = moekit.load(checkpoints("xverse")[0], dtype=torch.bfloat16)
    assert model.kernels.name == "cpu"
    logged = [r.getMessage() for r in caplog.records]
    assert logged[0].startswith("kernels: cpu") and any(line.startswith("  experts: ") for line in logged)


def test_one_token_forward_without_a_cache():
    """A key/value of one position sliced from the fused projection has a row stride no kernel reads but
    the C++ attention checks; head width 16 so the C++ attention (not its fallback) runs."""
    from moekit.config import ModelConfig, MoEConfig
    from moekit.models import MoEDecoder

    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_width=32), max_position_embeddings=32)
    fast, ref = MoEDecoder(cfg, kernels="cpu"), MoEDecoder(cfg, kernels="reference")
    fast.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    ref.load_state_dict(fast.state_dict())
    ids = torch.tensor([[5]])  # batch 1 too: .contiguous() then sees nothing to do
    with torch.inference_mode():
        assert rel(fast(ids), ref(ids)) < 1e-4
