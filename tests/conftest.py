"""Shared fixtures: tiny checkpoints in every family's real layout (written by tests/familyref)."""

import pytest
import torch

from tests.familyref.checkpoints import make_checkpoint
from tests.ggufconv import converted, converter, mixtral  # noqa: F401  (GGUF files by llama.cpp's converter)

# (id, family, variant): the cases every family test runs over.
CASES = [
    ("xverse", "xverse", {}),
    ("xverse-linear-rope", "xverse", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("xverse-dynamic-rope", "xverse", {"rope_scaling": {"type": "dynamic", "factor": 2.0},
                                       "max_position_embeddings": 6}),
    ("mixtral", "mixtral", {}),
    ("orion", "orion", {}),
    ("orion-rmsnorm", "orion", {"norm": "rms"}),
    ("llama_moe", "llama_moe", {}),
    ("llama_moe-uneven", "llama_moe", {"size_experts": [[8, 16, 24, 16], [16, 16, 16, 16]],
                                       "score_scale_factor": [2.0, 4.0]}),
    ("llama_moe-sft-linear-gate", "llama_moe", {"fmt": "safetensors", "gate_network": "linear"}),
    ("qwen2_moe", "qwen2_moe", {}),
    ("qwen2_moe-norm-topk", "qwen2_moe", {"norm_topk_prob": True}),
    ("deepseek", "deepseek", {}),
    ("llama", "llama", {}),
    ("llama-tied", "llama", {"tie_word_embeddings": True}),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{case id: (folder, hf config, float32 state dict)}, built lazily once per session; each case's weights
    come from its own seed, so a test sees the same weights run alone or in any order."""
    built = {}

    def get(case_id):
        if case_id not in built:
            _, family, variant = next(c for c in CASES if c[0] == case_id)
            folder = tmp_path_factory.mktemp(case_id)
            cfg, sd = make_checkpoint(family, folder, seed=CASE_IDS.index(case_id) + 1, **variant)  # whatever the order
            built[case_id] = (folder, cfg, sd)
        return built[case_id]

    return get


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """Tiny checkpoints with real tokenizer files: 'xverse' (tokenizer.json, byte fallback) and
    'llama_moe' (SentencePiece tokenizer.model), vocab 400."""
    from tests.tokfixtures import write_hf_bpe, write_sentencepiece

    built = {}

    def get(kind):
        if kind not in built:
            folder = tmp_path_factory.mktemp(f"text-{kind}")
            if kind == "xverse":
                cfg, _ = make_checkpoint("xverse", folder, seed=11, vocab_size=400, dtype="float32",
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
                write_hf_bpe(folder)
            else:
                cfg, _ = make_checkpoint("llama_moe", folder, seed=12, vocab_size=400)
                write_sentencepiece(folder)
            built[kind] = folder
        return built[kind]

    return get
