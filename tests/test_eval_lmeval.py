"""The lm-evaluation-harness adapter against lm-eval's own ``hf`` model (HFLM, transformers, float32, CPU) on
tiny Mixtral (SentencePiece-style tokenizer with BOS) and Qwen2-MoE (byte-level BPE, no BOS, ChatML template)
checkpoints: the same lm-eval Instances give the same loglikelihoods (1e-4), greedy flags, rolling
loglikelihoods, greedy generations with stop strings, chat prompts and multiple-choice accuracy; and the
``moekit`` name works from lm-eval's registry and its command line."""

import json
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance

from tests.familyref.checkpoints import make_checkpoint
from tests.lmevaltask import write_mc_task
from tests.tokfixtures import write_hf_bpe, write_sentencepiece

MAX_LENGTH = 24  # small, so long requests are left-truncated and rolling texts span several windows
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LONG = "The quick brown fox jumps over the lazy dog. Suzhou is famous of its beautiful gardens. " * 2
PAIRS = [
    ("In the beginning God created", " the heaven and the earth."),
    ("", "Hello, what is your name?"),  # empty context: conditioned on the prefix token (BOS, else EOS)
    ("北京的景点：", "故宫、天坛"),
    ("Question: where? ", "Answer"),  # the context's trailing space moves to the continuation
    (LONG, " Hello"),  # longer than max_length: truncated from the left
    ("Hello", ", what is your name? My name is moekit."),
]
DOCS = [
    {"question": "In the beginning God created the heaven and the", "choices": ["earth.", "sea.", "moon."],
     "answer": 0},
    {"question": "The quick brown fox jumps over the lazy", "choices": ["dog.", "cat.", "fox."], "answer": 0},
    {"question": "北京的景点：故宫、天坛、万里", "choices": ["长城", "花园", "世界"], "answer": 0},
    {"question": "Hello, what is your", "choices": [" name?", " garden?", " dog?"], "answer": 0},
    {"question": "Suzhou is famous of its beautiful", "choices": [" gardens.", " experts.", " models."],
     "answer": 0},
]


def req(kind, *args):
    return Instance(kind, {}, tuple(args), 0)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def pair(request, tmp_path_factory):
    """(MoekitLM, HFLM) on one tiny checkpoint folder."""
    from lm_eval.models.huggingface import HFLM

    from moekit.eval.lmeval import MoekitLM

    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "mixtral":
        make_checkpoint("mixtral", folder, seed=3, vocab_size=400, bos_token_id=1, eos_token_id=2, pad_token_id=None)
        write_sentencepiece(folder)
    else:
        make_checkpoint("qwen2_moe", folder, seed=4, vocab_size=400, bos_token_id=1, eos_token_id=2)
        write_hf_bpe(folder, byte_level=True, extra_special=("<|im_start|>", "<|im_end|>"), chat_template=CHATML)
    hf = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4, max_length=MAX_LENGTH)
    ours = MoekitLM(pretrained=str(folder), dtype="float32", device="cpu", max_length=MAX_LENGTH, progress=False)
    return ours, hf


def greedy_pairs(hf) -> list[tuple[str, str]]:
    """(context, continuation) pairs whose continuation is the model's greedy next token, found with transformers."""
    import torch

    found = []
    for context in ["Hello", "The quick brown", "In the beginning", "北京", "My name is", "Suzhou"]:
        ids = hf.tok_encode(context)
        with torch.no_grad():
            t = int(hf.model(torch.tensor([ids])).logits[0, -1].argmax())
        text = hf.tokenizer.decode([t])
        if hf.tok_encode(context + text) == ids + [t]:
            found.append((context, text))
    return found


def test_loglikelihood_equals_hflm(pair):
    ours, hf = pair
    greedy = greedy_pairs(hf)
    assert greedy, "no context whose greedy token survives retokenisation"
    requests = [req("loglikelihood", c, x) for c, x in PAIRS + greedy]
    want, got = hf.loglikelihood(requests), ours.loglikelihood(requests)
    assert len(got) == len(requests)
    for r, (w_ll, w_greedy), (g_ll, g_greedy) in zip(requests, want, got):
        assert g_ll == pytest.approx(w_ll, abs=1e-4), r.args
        assert g_greedy == w_greedy, r.args
    assert all(g for _, g in got[len(PAIRS):])
    assert len(hf.tok_encode(LONG)) > MAX_LENGTH + 1


def test_rolling_loglikelihood_equals_hflm(pair):
    ours, hf = pair
    texts = [LONG, "Hi", "北京的景点：故宫、天坛、万里长城等。深圳的景点：世界之窗、欢乐谷。", ""]
    windows = list(lm_utils.get_rolling_token_windows(ours.tok_encode(texts[0]), ours.prefix_token_id,
                                                       MAX_LENGTH, 1))
    assert len(windows) >= 3
    requests = [req("loglikelihood_rolling", t) for t in texts]
    want, got = hf.loglikelihood_rolling(requests), ours.loglikelihood_rolling(requests)
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_until_equals_hflm(pair):
    ours, hf = pair
    prompts = ["In the beginning", "Hello, what is", "北京的景点："]
    free = hf.generate_until([req("generate_until", p, {"until": [], "max_gen_toks": 10}) for p in prompts])
    # stop strings taken from the middle of the free generations, so they do cut
    stops = [[text[3:5], "\n\n"] if len(text) >= 5 else ["\n"] for text in free]
    requests = [req("generate_until", p, {"until": s, "max_gen_toks": 10, "do_sample": False})
                for p, s in zip(prompts, stops)]
    requests.append(req("generate_until", "The quick", {"until": "zzz", "max_gen_toks": 6, "temperature": 0.0}))
    want, got = hf.generate_until(requests), ours.generate_until(requests)
    assert got == want
    assert sum(len(g) < len(f) for g, f in zip(got, free)) >= 2  # the stops cut


def test_chat_template_equals_hflm(pair):
    ours, hf = pair
    if ours.tokenizer.chat_template is None:
        pytest.skip("this checkpoint has no chat template")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
               {"role": "assistant", "content": "Hi "}]
    assert ours.chat_template(True) == CHATML
    assert ours.tokenizer_name
    for messages, gen_prompt in ((history[:2], True), (history, False)):
        assert ours.apply_chat_template(messages, gen_prompt) == hf.apply_chat_template(messages, gen_prompt)


def write_task(folder) -> str:
    return write_mc_task(folder, "moekit_lm_mc", DOCS, ("acc", "acc_norm"))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for k, v in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                 ("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))):
        monkeypatch.setenv(k, v)
    return tmp_path


def test_simple_evaluate_multiple_choice_equals_hflm(pair, offline):
    from lm_eval.tasks import TaskManager

    ours, hf = pair
    task = write_task(offline)
    chat = ours.tokenizer.chat_template is not None  # Qwen2-MoE runs the task through its chat template
    tasks = TaskManager(include_path=str(offline), include_defaults=False)  # lm-eval's own tasks take ~20 s to index
    mine, theirs = (lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks, apply_chat_template=chat,
                                            log_samples=True) for lm in (ours, hf))
    for metric in ("acc,none", "acc_norm,none"):
        assert mine["results"][task][metric] == theirs["results"][task][metric]
    for a, b in zip(mine["samples"][task], theirs["samples"][task]):
        assert a["arguments"] == b["arguments"]
        if chat:
            assert a["arguments"][0][0].startswith("<|im_start|>user\n")
        for (ll_a, g_a), (ll_b, g_b) in ((ra[0], rb[0]) for ra, rb in zip(a["resps"], b["resps"])):
            assert ll_a == pytest.approx(ll_b, abs=1e-4)
            assert g_a == g_b


def test_registered_name_and_command_line(pair, offline):
    from lm_eval.api.registry import get_model

    from moekit.eval.lmeval import MoekitLM

    ours, _ = pair
    assert get_model("moekit") is MoekitLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models still resolve
    lm = get_model("moekit").create_from_arg_string(f"pretrained={ours.pretrained},dtype=float32,max_length=20",
                                                    {"batch_size": 1, "device": "cpu"})
    assert lm.max_length == 20 and lm.lm.engine.dtype == ours.lm.engine.dtype
    if ours.tokenizer.chat_template is not None:
        return  # the command line once is enough
    task = write_task(offline)
    out = offline / "out"
    run = subprocess.run([sys.executable, "-m", "moekit.eval.lmeval", "--model", "moekit", "--model_args",
                          f"pretrained={ours.pretrained},dtype=float32", "--tasks", task, "--include_path",
                          str(offline), "--output_path", str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert task in run.stdout and "acc" in run.stdout
    (result,) = out.rglob("results_*.json")
    assert json.loads(result.read_text())["results"][task]["acc,none"] >= 0
