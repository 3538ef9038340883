"""Self-check of the family reference against transformers (run: python -m tests.familyref.selfcheck).

1. mixtral / qwen2_moe (both norm_topk_prob settings) / llama (plain, tied, linear and
   dynamic-NTK rope_scaling): reference_logits vs transformers' own model loaded with
   from_pretrained(folder, dtype=float32, attn_implementation="eager"); no missing or
   unexpected keys allowed.
2. Every family and the main variants: make_checkpoint runs, the files on disk round-trip
   to the returned state dict, and reference_logits is finite.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import torch
from safetensors.torch import load_file

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from tests.familyref.checkpoints import make_checkpoint  # noqa: E402
from tests.familyref.reference import layer_norm, reference_logits  # noqa: E402

TOL = 1e-5  # max |ref - hf| / max |ref|; float32 HF vs float64 reference

HF_CASES = [
    ("mixtral", "MixtralForCausalLM", {}),
    ("qwen2_moe", "Qwen2MoeForCausalLM", {}),
    ("qwen2_moe", "Qwen2MoeForCausalLM", {"norm_topk_prob": True}),
    ("llama", "LlamaForCausalLM", {}),
    ("llama", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    ("llama", "LlamaForCausalLM", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("llama", "LlamaForCausalLM", {"rope_scaling": {"type": "dynamic", "factor": 2.0},
                                   "max_position_embeddings": 6}),
]

ALL_CASES = [
    ("xverse", {}),
    ("xverse", {"dtype": "float32", "rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("xverse", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 4}),
    ("mixtral", {}),
    ("orion", {}),
    ("orion", {"norm": "rms"}),
    ("llama_moe", {}),
    ("llama_moe", {"size_experts": [[8, 16, 24, 16], [16, 16, 16, 16]], "score_scale_factor": [2.0, 4.0]}),
    ("llama_moe", {"fmt": "safetensors"}),
    ("llama_moe", {"gate_network": "linear"}),
    ("qwen2_moe", {}),
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("deepseek", {}),
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
]


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref - got.to(torch.float64)).abs().max() / ref.abs().max()).item()


def read_back(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """Load whatever weight files make_checkpoint wrote (checks the index covers every file)."""
    out: dict[str, torch.Tensor] = {}
    for idx_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / idx_name).exists():
            wm = json.loads((folder / idx_name).read_text())["weight_map"]
            for f in sorted(set(wm.values())):
                part = load_file(str(folder / f)) if f.endswith(".safetensors") else torch.load(folder / f)
                assert all(wm[k] == f for k in part), f"index disagrees with {f}"
                out.update(part)
            assert set(out) == set(wm)
            return out
    for f in ("model.safetensors", "pytorch_model.bin"):
        if (folder / f).exists():
            return load_file(str(folder / f)) if f.endswith(".safetensors") else torch.load(folder / f)
    raise FileNotFoundError(folder)


def check_hf() -> None:
    import transformers

    g = torch.Generator().manual_seed(123)
    for family, cls_name, variant in HF_CASES:
        with tempfile.TemporaryDirectory() as tmp:
            cfg, sd = make_checkpoint(family, pathlib.Path(tmp), seed=7, **variant)
            cls = getattr(transformers, cls_name)
            model, info = cls.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                              output_loading_info=True)
            bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
            assert not bad and not info.get("error_msgs"), f"{family} {variant}: {info}"
            model.eval()
            ids = torch.randint(0, cfg["vocab_size"], (2, 9), generator=g)
            with torch.no_grad():
                hf = model(ids).logits
            ref = reference_logits(cfg, sd, ids)
            err = rel_err(ref, hf)
            print(f"HF  {family:10s} {json.dumps(variant):60s} max rel err {err:.2e}")
            assert err < TOL, err


def check_all() -> None:
    g = torch.Generator().manual_seed(5)
    for family, variant in ALL_CASES:
        with tempfile.TemporaryDirectory() as tmp:
            folder = pathlib.Path(tmp)
            cfg, sd = make_checkpoint(family, folder, seed=1, **variant)
            disk = read_back(folder)
            assert set(disk) == set(sd), set(disk) ^ set(sd)
            assert all(torch.equal(disk[k].float(), sd[k]) for k in sd)
            on_disk_cfg = json.loads((folder / "config.json").read_text())
            assert on_disk_cfg == cfg
            dtypes = sorted({str(v.dtype) for v in disk.values()})
            ids = torch.randint(0, cfg["vocab_size"], (2, 7), generator=g)
            ref = reference_logits(cfg, sd, ids)
            assert ref.shape == (2, 7, cfg["vocab_size"]) and ref.dtype == torch.float64
            assert torch.isfinite(ref).all()
            files = sorted(p.name for p in folder.iterdir())
            print(f"ALL {family:10s} {json.dumps(variant):80s} ok  {dtypes} {len(sd)} tensors, "
                  f"files={files}, |logits|max={ref.abs().max():.3f}")


def check_layer_norm() -> None:
    x, w, b = torch.randn(3, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    err = (layer_norm(x, w, b, 1e-5) - torch.nn.functional.layer_norm(x, (64,), w, b, 1e-5)).abs().max().item()
    print(f"LayerNorm vs torch: {err:.1e}")
    assert err < 1e-12


if __name__ == "__main__":
    check_layer_norm()
    check_hf()
    check_all()
    print("selfcheck passed")
