"""moekit route-stats: counts against an independent routing computation, hand-made cases, the command line."""

import argparse
import json
import math
from collections import Counter

import pytest
import torch

import moekit
from moekit import cli
from moekit.eval import routestats
from moekit.eval.routestats import LayerCounts, js_divergence, route_stats
from moekit.models.moe import MoE
from tests.tokfixtures import TEXT


def run_cli(*argv) -> int:
    """``moekit route-stats ...`` with moekit's error handling (the subcommand alone, as moekit.eval.cli adds it)."""
    p = argparse.ArgumentParser(prog="moekit")
    q = p.add_subparsers(dest="command", required=True).add_parser("route-stats")
    routestats.add_arguments(q)
    q.set_defaults(func=routestats.main)
    return cli.main(["route-stats", *map(str, argv)], parser=p)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(TEXT[:14]), encoding="utf-8")
    return path


def reference_routing(model, windows):
    """Per MoE layer: (ids [N, K], router distribution [N, E]) from the layer's input and the router's weights,
    with plain formulas (linear or tanh-MLP gate, softmax, torch.topk), not the model's routing code."""
    captured = [[] for b in model.layers if isinstance(b.ffn, MoE)]
    moes = [b.ffn for b in model.layers if isinstance(b.ffn, MoE)]
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1])))
             for i, m in enumerate(moes)]
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    out = []
    for m, xs in zip(moes, captured):
        x = torch.cat(xs).double()
        logits = x @ m.router.proj.weight.double().t()
        if m.router.proj2 is not None:
            logits = torch.tanh(logits) @ m.router.proj2.weight.double().t()
        p = logits.softmax(-1)
        out.append((p.topk(m.router.m.top_k, dim=-1).indices, p))
    return out


@pytest.mark.parametrize("kind", ["xverse", "llama_moe"])  # linear gate; LLaMA-MoE's tanh-MLP gate
def test_statistics_equal_an_independent_computation(text_checkpoint, text_file, kind):
    folder = text_checkpoint(kind)
    model = moekit.load(folder, dtype=torch.float32, kernels="reference")
    tok = moekit.Tokenizer.from_pretrained(folder)
    stats = route_stats(model, tok, [text_file], seq_len=16, max_tokens=70, batch=3)
    ids = tok.encode(text_file.read_text())[:70]
    windows = [torch.tensor(ids[s:s + 16]) for s in range(0, len(ids), 16)]
    m = model.config.moe
    (f,) = stats["files"]
    assert f["tokens"] == 70 and f["windows"] == 5 and stats["top_k"] == m.top_k
    for entry, (ids_NK, p_NE) in zip(f["layers"], reference_routing(model, windows), strict=True):
        load = Counter(ids_NK.flatten().tolist())
        assert entry["load"] == [load[e] for e in range(m.num_experts)]
        pairs = Counter((i, j) for row in ids_NK.tolist() for i in row for j in row)
        assert entry["coactivation"] == [[pairs[i, j] for j in range(m.num_experts)] for i in range(m.num_experts)]
        h = -(p_NE * p_NE.log()).sum(-1).mean().item()
        assert entry["token_entropy"] == pytest.approx(h, rel=1e-5)
        frac = [load[e] / (70 * m.top_k) for e in range(m.num_experts)]
        assert entry["load_fraction"] == pytest.approx(frac)
        assert entry["imbalance"] == pytest.approx(max(frac) * m.num_experts)
        assert entry["load_entropy"] == pytest.approx(-sum(q * math.log(q) for q in frac if q > 0))


def test_loads_sum_to_tokens_times_top_k_and_coactivation_is_symmetric(text_checkpoint, text_file, tmp_path):
    folder = text_checkpoint("xverse")
    model = moekit.load(folder, dtype=torch.float32, kernels="reference")
    other = tmp_path / "other.txt"
    other.write_text("北京的景点：故宫、天坛、万里长城等。" * 5, encoding="utf-8")
    stats = route_stats(model, moekit.Tokenizer.from_pretrained(folder), [text_file, other], seq_len=32, max_tokens=None)
    K = stats["top_k"]
    for f in stats["files"]:
        for e in f["layers"]:
            c = torch.tensor(e["coactivation"])
            assert sum(e["load"]) == f["tokens"] * K
            assert torch.equal(c, c.t()) and c.diagonal().tolist() == e["load"]
            assert (c.sum(1) == K * c.diagonal()).all()
            assert 0 <= e["token_entropy"] <= stats["max_entropy"] + 1e-9
    (d,) = stats["load_divergence"]
    assert d["reference"] == "text" and d["file"] == "other" and len(d["js"]) == len(stats["layers"])
    assert all(0 < x <= math.log(2) for x in d["js"])


def test_hand_made_counts():
    c = LayerCounts(4)
    c.add(torch.tensor([[0, 1], [0, 2], [0, 1]]), torch.zeros(3, 4), "softmax")
    s = c.summary(layer=5)
    assert s["layer"] == 5 and s["load"] == [3, 2, 1, 0] and s["imbalance"] == pytest.approx(3 / 1.5)
    assert s["coactivation"] == [[3, 2, 1, 0], [2, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert s["token_entropy"] == pytest.approx(math.log(4))  # equal logits: uniform over 4 experts
    assert s["load_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6))
    sig = LayerCounts(2)
    sig.add(torch.tensor([[0]]), torch.tensor([[math.log(3.0), 0.0]]), "sigmoid")  # scores 0.75, 0.5 -> 0.6, 0.4
    assert sig.summary(0)["token_entropy"] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    assert sig.summary(0)["imbalance"] == pytest.approx(2.0)  # one expert takes everything: E / K
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(math.log(2)) and js_divergence([0.5, 0.5], [0.5, 0.5]) == 0


def test_cli_writes_json_table_and_plots(text_checkpoint, text_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder = text_checkpoint("xverse")
    other = tmp_path / "zh.txt"
    other.write_text("\n".join(TEXT[4:7]), encoding="utf-8")
    out = tmp_path / "out"
    assert run_cli("--model", folder, "--data", text_file, other, "--seq-len", 24, "--max-tokens", 100,
                   "--layer", 0, "--out", out) == 0
    stats = json.loads((out / "route_stats.json").read_text())
    assert stats["schema"] == "moekit.route-stats/1" and stats["model"] == str(folder)
    assert [f["name"] for f in stats["files"]] == ["text", "zh"] and stats["layers"] == [0, 1]
    assert set(stats["files"][0]["layers"][0]) == {"layer", "load", "load_fraction", "imbalance", "token_entropy",
                                                   "load_entropy", "coactivation"}
    for png in ("route_load.png", "route_coact.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    row = stats["files"][1]["layers"][1]
    assert f"{row['imbalance']:5.2f} {row['token_entropy']:6.3f} {row['load_entropy']:6.3f}" in table


def test_bad_inputs_get_one_line_errors(text_checkpoint, checkpoints, text_file, tmp_path, capsys):
    folder = text_checkpoint("xverse")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    cases = [(["--model", folder, "--data", text_file, tmp_path / "missing.txt"], "missing.txt: no such data file"),
             (["--model", folder, "--data", empty], "empty.txt: the data file is empty"),
             (["--model", checkpoints("llama")[0], "--data", text_file], "has no MoE layers"),
             (["--model", folder, "--data", text_file, "--layer", 7], "--layer 7: not an MoE layer"),
             (["--model", folder, "--data", text_file, "--seq-len", 0], "--seq-len 0: must be at least 1")]
    for argv, message in cases:
        assert run_cli(*argv, "--out", tmp_path / "o") == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
