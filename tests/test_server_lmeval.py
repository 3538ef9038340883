"""lm-evaluation-harness as a client of moekit serve: its ``local-completions`` model scores a small
multiple-choice task (written here: a task YAML and a JSONL file) through /v1/completions (token-id prompts,
echo, logprobs, max_tokens=1), and the loglikelihoods it reads equal moekit's own in-process ones."""


import pytest

from moekit.engine import AsyncEngine, Engine
from moekit.server import create_app
from tests.lmevaltask import write_mc_task
from tests.servefixtures import MODEL, load_default, log_softmax, serving

DOCS = [
    {"question": "In the beginning God created the heaven and the", "choices": ["earth.", "sea.", "moon."],
     "answer": 0},
    {"question": "The LORD is my shepherd; I shall not", "choices": ["want.", "sleep.", "run away."], "answer": 0},
    {"question": "And God said, Let there be", "choices": ["cheese", "light", "a server"], "answer": 1},
    {"question": "白日依山尽，黄河入海", "choices": ["流。", "山。", "月。"], "answer": 0},
    {"question": "Blessed are the", "choices": [" meek", " GPUs", " peacemakers"], "answer": 2},
    {"question": "Question: What did Noah build?\nAnswer:", "choices": [" an ark", " a tower", " a temple"],
     "answer": 0},
]


def write_task(folder) -> str:
    return write_mc_task(folder, "moekit_mc", DOCS)


def test_lm_eval_local_completions_reads_moekit_loglikelihoods(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import moekit

    lm = load_default()
    engine = AsyncEngine(Engine(lm.model, eos_token_ids=lm.eos_token_ids))
    task = write_task(tmp_path)
    try:
        with serving(create_app(lm, engine, MODEL)) as url:
            client = get_model("local-completions")(
                model=MODEL, base_url=f"{url}/v1/completions", tokenizer=str(moekit.default_model_path()),
                tokenizer_backend="huggingface", batch_size=4, max_length=1024, max_retries=1)
            tasks = TaskManager(include_path=str(tmp_path))
            out = lm_eval.simple_evaluate(model=client, tasks=[task], task_manager=tasks, log_samples=True)
    finally:
        engine.shutdown()

    samples = out["samples"][task]
    assert len(samples) == len(DOCS)
    correct = 0
    for s in samples:
        assert len(s["arguments"]) == len(s["resps"]) == 3
        ours = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            loglik, is_greedy = resp[0]
            ctx, cont = client._encode_pair(context, continuation)  # the ids lm-eval sent
            lp = log_softmax(lm.model, ctx + cont)
            want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            assert loglik == pytest.approx(want, abs=1e-4), (context, continuation)
            greedy = all(int(lp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
            assert bool(is_greedy) == greedy
            ours.append(want)
        correct += max(range(3), key=ours.__getitem__) == s["doc"]["answer"]
    assert out["results"][task]["acc,none"] == pytest.approx(correct / len(DOCS))
