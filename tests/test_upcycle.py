"""Upcycling dense LLaMA checkpoints into experts: exactness, balanced clustering, layouts, CLI, trainer, errors."""

import json
import subprocess
import sys

import pytest
import torch

import moekit
from moekit.upcycle import UpcycleOptions, upcycle, upcycle_checkpoint, upcycle_from_spec
from moekit.upcycle.split import balanced_kmeans, capacity_assign, expert_sizes, select_shared
from tests.familyref.checkpoints import make_checkpoint
from tests.familyref.reference import reference_logits
from tests.tokfixtures import TEXT, write_hf_bpe

FFN = 96  # the familyref dense LLaMA: hidden 64, 2 layers, FFN width 96, GQA 4/2


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny dense LlamaForCausalLM checkpoint (HF layout, float32) with a tokenizer and a text file."""
    folder = tmp_path_factory.mktemp("dense")
    make_checkpoint("llama", folder, seed=3, dtype="float32", vocab_size=400, bos_token_id=1, eos_token_id=2)
    write_hf_bpe(folder)
    (folder.parent / "calib.txt").write_text("\n".join(TEXT))
    return folder


@pytest.fixture(scope="module")
def dense(dense_dir):
    return moekit.load(dense_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def windows(dense_dir):
    from moekit.upcycle import calibration_windows

    return calibration_windows(dense_dir.parent / "calib.txt", dense_dir, seq_len=32, max_windows=12)


@pytest.fixture
def ids():
    return torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(5))


def err(a, b):
    return float((a - b).detach().abs().max())


@pytest.mark.parametrize("gate", ["mlp", "linear"])
@pytest.mark.parametrize("method", ["random", "cluster", "importance"])
def test_partition_with_every_expert_active_is_exact(dense, windows, ids, method, gate):
    """top-k = E, a zero gate (weights 1/E each) and scale E: each expert's combined weight is 1."""
    ref = dense(ids)
    moe, rep = upcycle(dense, method=method, experts=4, top_k=4, scale=4.0, gate=gate, gate_init="zero",
                       calibration=windows)
    assert err(moe(ids), ref) < 1e-5
    assert moe.config.family == "llama_moe" and rep["calibration"]["upcycled_loss"] == pytest.approx(
        rep["calibration"]["dense_loss"], abs=1e-5)
    part = rep["partition"]
    for layer in part:  # a partition: every neuron in exactly one expert
        assert sorted(i for e in layer["experts"] for i in e) == list(range(FFN))
    # the FFNs matter: a wrong scale is visibly wrong
    wrong, _ = upcycle(dense, method=method, experts=4, top_k=4, scale=1.0, gate=gate, gate_init="zero",
                       calibration=windows)
    assert err(wrong(ids), ref) > 1e-3


@pytest.mark.parametrize("layout", ["deepseek", "xverse"])
def test_shared_experts_from_importance_are_exact(dense, windows, ids, layout):
    moe, rep = upcycle(dense, method="importance", experts=4, top_k=4, shared=2, gate="linear", gate_init="zero",
                       scale=4.0, layout=layout, calibration=windows)
    assert moe.config.family == layout and moe.config.moe.shared_width == 32  # 96 / (4 + 2) = 16 per expert
    assert rep["scale_stored_as"].startswith("folded")
    assert err(moe(ids), dense(ids)) < 1e-5
    layer = rep["partition"][0]
    assert sorted(layer["shared"] + [i for e in layer["experts"] for i in e]) == list(range(FFN))


def test_uneven_widths_use_size_experts(dense, ids):
    moe, _ = upcycle(dense, method="cluster", experts=5, top_k=5, scale=5.0, gate_init="zero")
    assert moe.config.moe.expert_width == ((20, 19, 19, 19, 19),) * 2
    assert err(moe(ids), dense(ids)) < 1e-5


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_copy_upcycling_is_exact_for_any_top_k(dense, ids, k):
    moe, rep = upcycle(dense, method="copy", experts=4, top_k=k, gate="linear", gate_init="random", seed=k)
    assert rep["scale"] == 1.0 and err(moe(ids), dense(ids)) < 1e-5
    noisy, _ = upcycle(dense, method="copy", experts=4, top_k=k, noise=0.1, layout="mixtral", gate="linear")
    assert noisy.config.family == "mixtral" and err(noisy(ids), dense(ids)) > 1e-4


def test_balanced_kmeans_gives_equal_sizes_and_finds_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=gen) * 10
    truth = torch.arange(8).repeat_interleave(12)
    x = centres[truth] + torch.randn(96, 16, generator=gen)
    labels, cents, _ = balanced_kmeans(x, [12] * 8, gen)
    assert torch.bincount(labels, minlength=8).tolist() == [12] * 8
    for e in range(8):  # each found cluster is exactly one true cluster
        assert truth[labels == e].unique().numel() == 1
    noise = torch.randn(1000, 7, generator=gen)  # structure-free data still splits exactly as asked
    assert torch.bincount(balanced_kmeans(noise[:992], [62] * 16, gen)[0]).tolist() == [62] * 16
    sizes = expert_sizes(1000, 16)
    assert torch.bincount(balanced_kmeans(noise, sizes, gen)[0], minlength=16).tolist() == sizes


def test_cluster_method_makes_every_expert_the_same_size(dense):
    _, rep = upcycle(dense, method="cluster", experts=8, top_k=2)
    assert all(layer["expert_neurons"] == [12] * 8 for layer in rep["layers"])
    assert all(sorted(i for e in p["experts"] for i in e) == list(range(FFN)) for p in rep["partition"])


def test_capacity_assign_and_shared_selection():
    cost = torch.tensor([[0.0, 5], [0, 4], [0, 1], [3, 0]])
    assert capacity_assign(cost, [2, 2]).tolist() == [0, 0, 1, 1]  # the neuron that loses least moves
    scores = torch.tensor([[9.0, 8, 1, 0, 0, 7], [9, 0, 8, 1, 0, 7]])  # neurons 0 and 5 matter to both groups
    assert select_shared(scores, 2, 2).tolist() == [0, 5]
    with pytest.raises(ValueError, match="do not split"):
        capacity_assign(cost, [1, 2])


def test_gates_zero_mlp_gate_still_learns_and_centroids(dense, ids):
    moe, rep = upcycle(dense, method="cluster", experts=4, top_k=2, gate="mlp", gate_init="zero")
    r = moe.layers[0].ffn.router
    assert float(r.proj2.weight.detach().abs().max()) == 0 and float(r.proj.weight.detach().abs().max()) > 0
    assert float(r.noise.weight.detach().abs().max()) == 0  # LLaMA-MoE's noise projection starts at zero
    moe.train()
    moe(ids).sum().backward()
    assert float(r.proj2.weight.grad.abs().max()) > 0
    cen, rep = upcycle(dense, method="cluster", experts=4, top_k=2, gate="linear", gate_init="centroids")
    F = FFN
    up = dense.layers[1].ffn.w13[F:].detach()
    rows = cen.layers[1].ffn.router.proj.weight.detach()
    for e, ix in enumerate(rep["partition"][1]["experts"]):
        assert torch.allclose(rows[e], up[ix].mean(0), atol=1e-6)


def test_checkpoint_round_trip_in_llama_moe_layout(dense_dir, dense, ids, tmp_path):
    """Written in LLaMA-MoE's own layout: moekit.load and an independent LLaMA-MoE reference agree."""
    out = tmp_path / "moe"
    rep = upcycle_checkpoint(dense_dir, out, method="random", experts=4, top_k=2, calibration=dense_dir.parent /
                             "calib.txt", seq_len=32, max_windows=4, progress=False)
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["LlamaMoEForCausalLM"] and hf["num_experts"] == 4 and hf["num_selects"] == 2
    assert hf["size_experts"] == [[24] * 4] * 2 and hf["score_scale_factor"] == 2.0 and hf["gate_network"] == "mlp"
    assert (out / "tokenizer.json").is_file() and (out / "upcycle_report.md").is_file()
    saved = json.loads((out / "upcycle_report.json").read_text())
    assert saved["calibration"]["windows"] == 4 and saved["layers"][0]["expert_neurons"] == [24] * 4
    assert len(json.loads((out / "upcycle_partition.json").read_text())) == 2
    moe = moekit.load(out, dtype=torch.float32)
    from safetensors.torch import load_file

    sd = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert "model.layers.0.mlp.calculator.experts.weight_up.3" in sd
    assert err(moe(ids).double(), reference_logits(hf, sd, ids)) < 1e-5
    again, _ = upcycle(dense, method="random", experts=4, top_k=2)  # same seed, same model in memory
    assert err(again(ids), moe(ids)) < 1e-6
    from moekit.upcycle import calibration_windows, lm_loss

    win = calibration_windows(dense_dir.parent / "calib.txt", dense_dir, seq_len=32, max_windows=4)
    assert rep["calibration"]["dense_loss"] == pytest.approx(lm_loss(dense, win), abs=1e-6)
    assert rep["calibration"]["upcycled_loss"] == pytest.approx(lm_loss(moe, win), abs=1e-5)


def test_deepseek_layout_with_shared_experts_matches_reference(dense_dir, ids, tmp_path):
    out = tmp_path / "ds"
    upcycle_checkpoint(dense_dir, out, method="importance", experts=4, top_k=2, shared=2, gate="linear",
                       calibration=dense_dir.parent / "calib.txt", seq_len=32, max_windows=8, progress=False)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "deepseek" and hf["n_shared_experts"] == 2 and hf["norm_topk_prob"] is True
    from safetensors.torch import load_file

    sd = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert err(moekit.load(out, dtype=torch.float32)(ids).double(), reference_logits(hf, sd, ids)) < 1e-5


def test_bin_checkpoint_upcycles(tmp_path, ids):
    make_checkpoint("llama", tmp_path / "bin", seed=4, dtype="float32", fmt="bin")
    dense = moekit.load(tmp_path / "bin", dtype=torch.float32)
    upcycle_checkpoint(tmp_path / "bin", tmp_path / "out", method="copy", experts=2, top_k=1, progress=False)
    assert err(moekit.load(tmp_path / "out", dtype=torch.float32)(ids[:, :5] % 128), dense(ids[:, :5] % 128)) < 1e-5


def cli(*args):
    return subprocess.run([sys.executable, "-m", "moekit.cli", "upcycle", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_cli_end_to_end_and_one_line_errors(dense_dir, tmp_path):
    out = tmp_path / "cli"
    r = cli("--model", dense_dir, "--out", out, "--method", "cluster", "--experts", "8", "--top-k", "2",
            "--gate-init", "centroids", "--calibration", dense_dir.parent / "calib.txt", "--seq-len", "32",
            "--windows", "4")
    assert r.returncode == 0, r.stderr
    assert "# Upcycling report" in r.stdout and "| 0 | 8 x 12 | 0 |" in r.stdout and "upcycled before training" in r.stdout
    assert moekit.load(out).config.moe.num_experts == 8
    bad = cli("--model", dense_dir, "--out", tmp_path / "x", "--method", "random", "--experts", "4", "--top-k", "5")
    assert bad.returncode == 2 and "top_k=5 must be in 1..experts=4" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw, message", [
    (dict(experts=4, top_k=5), "top_k=5"),
    (dict(experts=4, top_k=0), "top_k=0"),
    (dict(experts=100, top_k=2), "more than the FFN width 96"),
    (dict(experts=5, top_k=2, shared=2, gate="linear"), "must divide the FFN width 96"),
    (dict(experts=5, top_k=2, layout="mixtral", gate="linear"), "must divide the FFN width 96"),
    (dict(experts=4, top_k=2, shared=2), "only the llama_moe layout has an MLP gate"),
    (dict(experts=4, top_k=2, shared=2, layout="llama_moe"), "llama_moe layout has no shared experts"),
    (dict(experts=4, top_k=2, shared=2, gate="linear"), "needs a calibration text"),
    (dict(method="importance", experts=4, top_k=2), "needs a calibration text"),
    (dict(method="random", experts=4, top_k=2, noise=0.1), "only copy-upcycling takes noise"),
    (dict(method="copy", experts=4, top_k=2, shared=1), "copy-upcycling has no shared experts"),
    (dict(method="copy", experts=4, top_k=2, gate_init="centroids"), "needs a partition method"),
    (dict(method="kmeans", experts=4, top_k=2), "method='kmeans' must be one of"),
    (dict(experts=4, top_k=2, sharde=1), "unknown option"),
])
def test_bad_options_name_the_option(dense, kw, message):
    with pytest.raises(ValueError, match=message):
        upcycle(dense, **kw)


def test_moe_model_is_rejected(tmp_path):
    make_checkpoint("mixtral", tmp_path / "mx", seed=1)
    with pytest.raises(ValueError, match="already has experts"):
        upcycle(moekit.load(tmp_path / "mx"), experts=2, top_k=1)


def test_trainer_builds_from_an_upcycle_spec(dense_dir, tmp_path):
    from moekit.train import load_config, train

    spec = {"path": str(dense_dir), "method": "random", "experts": 4, "top_k": 2}
    model = upcycle_from_spec(spec, {"moe": {"aux_loss_coef": 0.02}}, seed=1)
    assert model.training and model.embed.weight.dtype == torch.float32 and model.config.moe.aux_loss_coef == 0.02
    with pytest.raises(ValueError, match="would change the shapes"):
        upcycle_from_spec(spec, {"moe": {"num_experts": 8}})
    with pytest.raises(ValueError, match="model.upcycle: unknown option"):
        upcycle_from_spec({**spec, "expert": 3})
    (tmp_path / "text.txt").write_text("\n\n".join(TEXT))
    run = {"out_dir": str(tmp_path / "run"), "tokenizer": str(dense_dir), "steps": 3, "batch_size": 2,
           "precision": "fp32", "model": {"upcycle": spec},
           "data": {"seq_len": 16, "cache_dir": str(tmp_path / "cache"),
                    "sources": [{"name": "t", "paths": [str(tmp_path / "text.txt")], "separator": "\n\n",
                                 "heldout": 0.1}]},
           "eval_every": 3, "eval_batches": 1, "save_every": 0}
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    last = train(load_config(tmp_path / "run.yaml"))
    assert last["step"] == 3 and "eval_loss" in last and len(last["load"]) == 2
    assert moekit.load(tmp_path / "run" / "model").config.family == "llama_moe"


def test_options_scale_defaults():
    assert UpcycleOptions(experts=16, top_k=4).routed_scale() == 4.0
    assert UpcycleOptions(method="copy", experts=8, top_k=2).routed_scale() == 1.0


def test_importance_scores_frozen_model_and_taylor_formula(dense, windows):
    """Scores equal |a * dL/da| summed over tokens (the last layer checked by hand), frozen weights or not."""
    import torch.nn.functional as F

    from moekit.upcycle import neuron_importance

    scores, feats = neuron_importance(dense, windows[:2])
    assert len(scores) == 2 and scores[0].shape == (2, FFN) and feats.shape == (2, 64)
    for p in dense.parameters():
        p.requires_grad_(False)
    try:
        frozen, _ = neuron_importance(dense, windows[:2])
    finally:
        for p in dense.parameters():
            p.requires_grad_(True)
    assert torch.allclose(frozen[1], scores[1])
    block, x = dense.layers[-1], windows[1:2]
    seen = []
    handle = block.ffn_norm.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        dense(x[:, :-1])
    handle.remove()
    resid, h = (t.detach() for t in seen[0])
    w13 = block.ffn.w13.detach()
    a = (F.silu(F.linear(h, w13[:FFN])) * F.linear(h, w13[FFN:])).requires_grad_()
    logits = F.linear(dense.norm(resid + F.linear(a, block.ffn.w2.detach())), dense.output_weight.detach())
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].reshape(-1))
    (g,) = torch.autograd.grad(loss, a)
    want = (a.detach() * g).abs().sum((0, 1)).double()
    assert float(want.sum()) > 0 and torch.allclose(scores[1][1], want, rtol=1e-4, atol=1e-9)
