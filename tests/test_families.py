"""Every family loads from its real layout and matches an independent implementation.

Mixtral (APUS), Qwen2-MoE and dense LLaMA are checked against transformers' own
classes; XVERSE-MoE, Orion-MoE, LLaMA-MoE and DeepSeek-MoE against
tests/familyref/reference.py, written from families.md alone.
"""

import pytest
import torch

import moekit
from tests.conftest import CASE_IDS, CASES
from tests.familyref.reference import reference_logits

HF_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "llama": "LlamaForCausalLM"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def hf_logits(family, folder, input_ids):
    import transformers

    cls = getattr(transformers, HF_CLASSES[family])
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("case", CASE_IDS)
def test_logits_match_independent_implementation(case, checkpoints, input_ids):
    folder, hf, sd = checkpoints(case)
    family = next(c[1] for c in CASES if c[0] == case)
    model = moekit.load(folder, dtype=torch.float32)
    with torch.no_grad():
        got = model(input_ids)
    assert got.shape == (2, 9, hf["vocab_size"])
    want = hf_logits(family, folder, input_ids) if family in HF_CLASSES else reference_logits(hf, sd, input_ids)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_reference_agrees_with_transformers(case, checkpoints, input_ids):
    """The hand-written oracle is itself checked on the families transformers implements."""
    folder, hf, sd = checkpoints(case)
    assert rel_err(reference_logits(hf, sd, input_ids), hf_logits(case, folder, input_ids)) < 1e-5


def test_families_are_recognised_by_config_fields(checkpoints):
    want = {"xverse": ("xverse", "rms"), "orion": ("orion", "layer"), "orion-rmsnorm": ("orion", "rms"),
            "llama_moe": ("llama_moe", "rms"), "deepseek": ("deepseek", "rms")}
    for case, (family, norm) in want.items():
        cfg = moekit.weights.read_config(checkpoints(case)[0])[0]
        assert (cfg.family, cfg.norm) == (family, norm), case
    cfg = moekit.weights.read_config(checkpoints("llama_moe-uneven")[0])[0]
    assert cfg.moe.expert_width == ((8, 16, 24, 16), (16, 16, 16, 16)) and cfg.moe.routed_scale == (2.0, 4.0)


def test_dense_xverse_is_not_moe(tmp_path, checkpoints):
    """XverseForCausalLM is MoE only when num_experts is present."""
    folder, hf, sd = checkpoints("llama")
    import json
    import shutil

    dense = tmp_path / "xverse-dense"
    shutil.copytree(folder, dense)
    cfg = {**hf, "architectures": ["XverseForCausalLM"], "model_type": "xverse"}
    (dense / "config.json").write_text(json.dumps(cfg))
    model = moekit.load(dense, dtype=torch.float32)
    assert model.config.moe is None and model.config.family == "xverse"
