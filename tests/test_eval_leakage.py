"""``moekit leakage`` against the reference method (nishiwen1214/Benchmark-leakage-detection): rendering byte for
byte, the label-token rule on both tokenizations, per-permutation scores equal to the reference's transformers
computation (float64 log-softmax, and float32) on tiny Mixtral and Qwen2-MoE checkpoints, flagged sets equal
to a transcription of get_outlier.py, the output files, the table, and one-line errors for bad input."""

import itertools
import json
import math

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("transformers")

from moekit.errors import MoekitError
from moekit.eval import leakage
from tests.familyref.checkpoints import make_checkpoint
from tests.tokfixtures import write_hf_bpe, write_sentencepiece

QUESTIONS = [  # the reference's input format; the third has two equal options (exact ties)
    {"question": "In the beginning God created the", "option": {"A": "heaven", "B": "earth", "C": "dog", "D": "garden"}},
    {"question": "The quick brown fox jumps over the", "option": {"A": "lazy dog.", "B": "name", "C": "fox", "D": "moon"}},
    {"question": "Hello, what is your name?", "option": {"A": "moekit", "B": "moekit", "C": "Suzhou", "D": "北京"}},
    {"question": "Suzhou is famous of its", "option": {"A": "gardens.", "B": "experts", "C": "models", "D": "fox"}},
]
THRESHOLDS = [-0.2, -0.17, -0.15, -0.05, 0.0, 0.05]


def reference_render(row):
    """data_process.py's f-string, verbatim."""
    out = []
    for perm in itertools.permutations(["A", "B", "C", "D"]):
        out.append({"instruction":
f"""
{row['question']}:
A:{row['option'][perm[0]]}
B:{row["option"][perm[1]]}
C:{row["option"][perm[2]]} 
D:{row["option"][perm[3]]}
""",
        })
    return out


def reference_find_indices(lst, value):
    """inference_logprobs.py's label rule, verbatim."""
    indices = []
    for i, elem in enumerate(lst):
        if (elem == value and len(lst[i + 1]) != 0 and lst[i + 1][0] == ":") or elem == 'A:':
            indices.append(i)
            return indices
    return indices


def reference_outliers(list_data, list_logprobs, method, permutation_num, thresholds):
    """get_outlier.py's logic (files replaced by return values)."""
    from sklearn.ensemble import IsolationForest

    list_data = [list_data[i:i + permutation_num] for i in range(0, len(list_data), permutation_num)]
    list_logprobs = [list_logprobs[i:i + permutation_num] for i in range(0, len(list_logprobs), permutation_num)]
    if method == "shuffled":
        outliers = [[] for _ in thresholds]
        for index, data in enumerate(list_logprobs):
            X = np.array(data).reshape(-1, 1)
            clf = IsolationForest(n_estimators=100, contamination='auto', random_state=42)
            clf.fit(X)
            scores = clf.decision_function(X)
            max_value_index = np.argmax(data)
            max_value_score = scores[max_value_index]
            for outlier_index, threshold in enumerate(thresholds):
                if max_value_score < threshold:
                    outliers[outlier_index].append({"index": str(index), "max_value_index": str(max_value_index),
                                                    "data": list_data[index][max_value_index]["instruction"],
                                                    "logprobs": data[max_value_index]})
        return {str(t): o for t, o in zip(thresholds, outliers)}
    outliers = []
    for index, data in enumerate(list_logprobs):
        max = data[0]
        isMax = True
        for temp in data[1:]:
            if temp > max:
                isMax = False
                break
        if isMax:
            outliers.append({"index": str(index), "max_value_index": str(0), "data": list_data[index][0]["instruction"],
                             "logprobs": data[0]})
    return {"max": outliers}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny checkpoints by family: Mixtral with a SentencePiece tokenizer (BOS; 'A' and ':' are separate
    tokens), Qwen2-MoE with a byte-level BPE given an 'A:' token."""
    from tokenizers import AddedToken, Tokenizer

    built = {}

    def get(family):
        if family not in built:
            folder = built[family] = tmp_path_factory.mktemp(family)
            if family == "mixtral":
                make_checkpoint("mixtral", folder, seed=5, vocab_size=400, bos_token_id=1, eos_token_id=2,
                                pad_token_id=None)
                write_sentencepiece(folder)
            else:
                make_checkpoint("qwen2_moe", folder, seed=6, vocab_size=416, bos_token_id=1, eos_token_id=2)
                write_hf_bpe(folder, byte_level=True)
                tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
                tok.add_tokens([AddedToken("A:", normalized=False)])
                tok.save(str(folder / "tokenizer.json"))
        return built[family]

    return get


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def model(request, folders):
    """(family, moekit CausalLM, transformers model, AutoTokenizer) on one tiny checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit import CausalLM

    folder = folders(request.param)
    lm = CausalLM.from_pretrained(folder, dtype="float32", kernels="reference")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    return request.param, lm, hf, AutoTokenizer.from_pretrained(folder)


def reference_score(hf, tokenizer, prompt):
    """inference_logprobs.py's score() + display(): (float64 log-softmax sum, float32 log-softmax sum, label)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        input_tokens = [tokenizer.decode([id]) for id in input_ids[0]]
        index = reference_find_indices(input_tokens, 'A')[0]
        logits = hf(input_ids).logits
    sums = []
    for dtype in (torch.float64, torch.float32):
        all_tokens_logprobs = F.log_softmax(logits.to(dtype), dim=2)
        input_logprobs = [float(all_tokens_logprobs[0, k - 1, input_ids[0, k]]) for k in range(1, input_ids.shape[1])]
        sums.append(sum(input_logprobs[index:]))
    return sums[0], sums[1], input_tokens[index]


def test_rendering_matches_reference_byte_for_byte():
    for row in QUESTIONS:
        opts = [row["option"][k] for k in "ABCD"]
        ours = [leakage.render(row["question"], p) for p in leakage.permutations(opts)]
        assert ours == [r["instruction"] for r in reference_render(row)]
    assert leakage.render("Q", ["1", "2", "3", "4", "5"]) == "\nQ:\nA:1\nB:2\nC:3 \nD:4\nE:5\n"
    assert len(leakage.permutations(list("abcde"))) == 120


def test_label_rule():
    cases = [["", "\n", "Q", ":", "\n", "A", ":", "x"], ["\n", "Q", ":", "\n", "A:", "x"],
             ["\n", "A", "B", "A", ":x", "A:"], ["A", "A:", "x"], ["\n", "A", ""], ["B", ":", "C:"]]
    for pieces in cases[:4]:
        assert leakage.label_index(pieces) == reference_find_indices(pieces + ["?"], "A")[0]
    assert leakage.label_index(cases[4]) is None and leakage.label_index(cases[5]) is None
    assert leakage.label_index(["x", "A"]) is None  # the reference would raise IndexError here


def test_scores_equal_reference_transformers(model):
    family, lm, hf, hf_tok = model

    questions = [(r["question"], [r["option"][k] for k in "ABCD"]) for r in QUESTIONS]
    result = leakage.detect(lm, questions, "both", THRESHOLDS, progress=False)
    assert len(result["logprobs"]) == 24 * len(QUESTIONS)
    labels, worst = set(), 0.0
    for text, ours in zip(result["texts"], result["logprobs"]):
        assert lm.tokenizer.encode(text) == hf_tok(text).input_ids  # the same tokens as the reference
        want64, want32, label = reference_score(hf, hf_tok, text)
        assert ours == pytest.approx(want64, abs=1e-4) and ours == pytest.approx(want32, abs=1e-4), text
        worst = max(worst, abs(ours - want64))
        labels.add(label)
    assert labels == ({"A"} if family == "mixtral" else {"A:"})  # both tokenizations are exercised
    dup = result["logprobs"][48:72]  # options A and B are equal: swapping them gives the same text, same score
    assert dup[0] == dup[6]
    print(f"{family}: max |moekit - reference float64| = {worst:.2e}")

    flat = [{"instruction": t} for t in result["texts"]]
    want = {**reference_outliers(flat, result["logprobs"], "not_shuffled", 24, THRESHOLDS),
            **reference_outliers(flat, result["logprobs"], "shuffled", 24, THRESHOLDS)}
    assert result["outliers"] == want
    assert any(want[str(t)] for t in THRESHOLDS)  # the comparison covers real records


def test_flags_equal_reference_on_planted_scores():
    rng = np.random.default_rng(0)
    blocks, texts = [], []
    for q in range(12):
        s = list(rng.normal(-60, 2, 24))
        if q % 3 == 0:
            s[0] = max(s) + 3 + q  # a clear outlier at the original order
        elif q % 3 == 1:
            s[0] = max(s)  # a tie with the maximum still flags in scenario a
            s[5] = s[0]
        blocks += s
        texts += [f"q{q} p{k}" for k in range(24)]
    spans = [(24 * q, 24 * q + 24) for q in range(12)]
    got = leakage.flag(texts, blocks, spans, "both", THRESHOLDS)
    flat = [{"instruction": t} for t in texts]
    want = {**reference_outliers(flat, blocks, "not_shuffled", 24, THRESHOLDS),
            **reference_outliers(flat, blocks, "shuffled", 24, THRESHOLDS)}
    assert got["outliers"] == want
    assert {int(r["index"]) for r in want["max"]} >= {0, 1, 3, 4, 6, 7, 9, 10}
    assert {"0", "3", "6", "9"} <= {r["index"] for r in want["-0.2"]}  # the planted outliers
    assert got["ratios"]["-0.2"] == len(want["-0.2"]) / 12 < got["ratios"]["0.0"]


def run_cli(argv, capsys):
    import argparse

    from moekit import cli

    p = argparse.ArgumentParser(prog="moekit")
    sub = p.add_subparsers(dest="command", required=True).add_parser("leakage")
    leakage.add_arguments(sub)
    sub.set_defaults(func=leakage.main)
    rc = cli.main(["leakage", *argv], parser=p)
    return rc, capsys.readouterr()


def test_cli_outputs_and_table(folders, tmp_path, capsys):
    ckpt = folders("mixtral")
    data = tmp_path / "bench.jsonl"
    data.write_text("\n".join(json.dumps({"question": r["question"], "choices": list(r["option"].values())})
                              for r in QUESTIONS[:2]) + "\n")
    rc, out = run_cli(["--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "run"), "--quiet",
                       "--name", "tiny", "--thresholds", "-0.2", "0.1"], capsys)
    assert rc == 0, out.err
    run = tmp_path / "run"
    logprobs = json.loads((run / "logprobs.json").read_text())
    perms = json.loads((run / "permutations_data.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert len(logprobs) == len(perms) == 48 and all(math.isfinite(x) for x in logprobs)
    assert perms[:24] == reference_render(QUESTIONS[0])
    assert sorted(p.name for p in run.iterdir()) == ["logprobs.json", "outliers-0.2.json", "outliers0.1.json",
                                                    "outliers_max.json", "per_question.json",
                                                    "permutations_data.json", "summary.json"]
    assert summary["questions"] == 2 and summary["benchmark"] == "bench" and set(summary["ratios"]) == \
        {"not_shuffled", "-0.2", "0.1"}
    assert "tiny on bench: shuffled, threshold -0.2: leakage ratio" in out.out

    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({**summary, "name": "big", "benchmark": "cmmlu",
                                                    "ratios": {"-0.2": 0.25}}))
    rc, out = run_cli(["--table", str(run), str(other), "--out", str(tmp_path / "t.md")], capsys)
    assert rc == 0
    r = summary["ratios"]["-0.2"]
    assert (tmp_path / "t.md").read_text() == out.out == (
        "| Threshold -0.2 | bench | cmmlu |\n| --- | ---: | ---: |\n"
        f"| tiny | {r:.2f} | - |\n| big | - | 0.25 |\n")


@pytest.mark.parametrize("content, message", [
    ('[{"question": "q", "option": {"A": "x"}}]', "question 0: has 1 option(s); need 2 to 6"),
    ('[{"question": "q", "choices": ["x", "y"]}, {"question": "q", "choices": ["x"]}]', "question 1: has 1 option"),
    ('[{"question": "q", "choices": ["x", "y"]}, {"options": ["x", "y"]}]', "question 1: needs a string field"),
    ('[{"question": "q", "option": {"A": "x", "C": "y"}}]', "question 0: 'option' keys must be A, B"),
    ('[{"question": "q", "choices": ["x", 3]}]', "question 0: every option must be a string"),
    ('{"question": "q", "choices": ["x", "y"]}\n{"question": ', ":2: not valid JSON"),
    ('[{"question": "q", "choices": ["x", "y"]},]', "not valid JSON"),
    ("[]", "no questions"),
])
def test_bad_input_one_line(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(MoekitError) as e:
        leakage.load_questions(f)
    assert str(f) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_bad_input_cli(tmp_path, capsys):
    rc, out = run_cli(["--model", str(tmp_path), "--data", str(tmp_path / "missing.json"), "--out",
                       str(tmp_path / "o")], capsys)
    assert rc == 2 and out.err == f"moekit leakage: error: {tmp_path / 'missing.json'}: no such file\n"
    f = tmp_path / "few.json"
    f.write_text('[{"question": "q", "choices": ["a", "b"]}, {"question": "q2", "choices": ["only"]}]')
    rc, out = run_cli(["--model", str(tmp_path), "--data", str(f), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and out.err.count("\n") == 1 and f"{f}: question 1: has 1 option(s)" in out.err
    rc, out = run_cli(["--table", str(tmp_path)], capsys)
    assert rc == 2 and "summary.json: no such file" in out.err and out.err.count("\n") == 1
