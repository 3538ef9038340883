"""Token shards, windows, mixtures (static and dynamic, resumable) and SFT masks."""

import json

import numpy as np
import pytest

from moekit.chat import TEMPLATES, ChatFormat
from moekit.tokenizer import Tokenizer
from moekit.train.data import Mixture, Source, TokenStream, build_shard, documents, is_heldout
from moekit.train.sft import chat_encoder, text_encoder
from tests.tokfixtures import TEXT, write_hf_bpe


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_hf_bpe(folder)
    return Tokenizer.from_pretrained(folder)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n%\n".join(f"document {i}: {TEXT[i % len(TEXT)]}" for i in range(40)))
    return Source("docs", [str(path)], separator="\n%\n", heldout=0.1)


def test_shards_separate_documents_with_eos_and_hold_out_a_fraction(tok, corpus, tmp_path):
    paths = build_shard(corpus, text_encoder(tok), tok.eos_token_id, 400, tmp_path / "cache", "k", progress=False)
    meta = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    train = np.fromfile(paths["train"], dtype=np.uint16)
    held = np.fromfile(paths["heldout"], dtype=np.uint16)
    assert meta["documents"] == 40 and (held == tok.eos_token_id).sum() == 4  # every 10th document
    assert (train == tok.eos_token_id).sum() == 36 and train[-1] == tok.eos_token_id
    assert tok.decode(held[:held.tolist().index(tok.eos_token_id)]).startswith("document 9:")
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # nothing half-written left behind


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.1, 0.3, 0.5])
def test_one_heldout_rule_for_shards_and_recipes(tok, corpus, tmp_path, fraction):
    """build_shard's held-out split, the recipe's is_heldout and the rule itself pick the same documents."""
    import importlib.util
    from pathlib import Path

    every = round(1 / fraction) if fraction else 0
    assert [i for i in range(40) if is_heldout(i, fraction)] == list(range(every - 1, 40, every) if every else [])
    spec = importlib.util.spec_from_file_location(
        "embedded_prepare", Path(__file__).parents[1] / "recipes" / "embedded" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    assert [prepare.is_heldout(i, fraction) for i in range(40)] == [is_heldout(i, fraction) for i in range(40)]
    corpus.heldout = fraction
    paths = build_shard(corpus, text_encoder(tok), tok.eos_token_id, 400, tmp_path, "k", progress=False)
    docs = list(documents(corpus))
    expect = [t for i, d in enumerate(docs) if is_heldout(i, fraction) for t in text_encoder(tok)(d)[0]]
    assert np.fromfile(paths["heldout"], dtype=np.uint16).tolist() == expect


def test_shards_are_reused_until_inputs_change(tok, corpus, tmp_path):
    calls = []

    def encode(doc):
        calls.append(doc)
        return text_encoder(tok)(doc)

    build_shard(corpus, encode, tok.eos_token_id, 400, tmp_path, "k", progress=False)
    n = len(calls)
    build_shard(corpus, encode, tok.eos_token_id, 400, tmp_path, "k", progress=False)
    assert len(calls) == n  # reused
    build_shard(corpus, encode, tok.eos_token_id, 400, tmp_path, "other-tokenizer", progress=False)
    assert len(calls) == 2 * n  # a different tokenizer rebuilds


def test_windows_cover_an_epoch_in_a_seeded_order(tok, corpus, tmp_path):
    paths = build_shard(corpus, text_encoder(tok), tok.eos_token_id, 400, tmp_path, "k", progress=False)
    s = TokenStream(paths["train"], 16, seed=3)
    tokens = np.asarray(s.tokens)
    epoch = [s.window(i)[0] for i in range(s.windows)]
    order = s._order.copy()
    assert sorted(order.tolist()) == list(range(s.windows))  # every window exactly once per epoch
    assert all((w == tokens[j * 16:j * 16 + 17]).all() for w, j in zip(epoch, order))
    again = TokenStream(paths["train"], 16, seed=3)
    assert all((again.window(i)[0] == w).all() for i, w in enumerate(epoch))
    other = TokenStream(paths["train"], 16, seed=4)
    other.window(0)
    assert not (other._order == order).all()
    s.window(s.windows)  # the next epoch is a fresh permutation
    assert not (s._order == order).all()


class FakeStream:
    def __init__(self, tag):
        self.tag, self.windows = tag, 1000

    def window(self, i):
        return np.array([self.tag, i, 0]), None


def test_mixture_weights_and_exact_resume():
    mix = Mixture(["a", "b"], [FakeStream(0), FakeStream(1)], [3.0, 1.0], seed=5)
    rows = np.concatenate([mix.next_batch(32)[0] for _ in range(50)])
    assert abs((rows[:, 0] == 0).mean() - 0.75) < 0.03
    state = mix.state_dict()
    expect = [mix.next_batch(8)[0] for _ in range(3)]
    resumed = Mixture(["a", "b"], [FakeStream(0), FakeStream(1)], [3.0, 1.0], seed=5)
    resumed.load_state_dict(state)
    assert all((a == b).all() for a, b in zip(expect, [resumed.next_batch(8)[0] for _ in range(3)]))


def test_dynamic_mixture_update_hand_computed():
    mix = Mixture(["a", "b"], [FakeStream(0), FakeStream(1)], [0.5, 0.5], dynamic={"eta": 1.0, "smoothing": 0.0},
                  reference={"a": 2.0, "b": 2.0})
    mix.update_weights({"a": 3.0, "b": 1.5})  # a is above its reference by 1, b below (clipped to 0)
    want_a = 0.5 * np.e / (0.5 * np.e + 0.5)
    assert np.allclose(mix.weights, [want_a, 1 - want_a])


def test_sft_mask_covers_only_assistant_replies(tok):
    fmt = ChatFormat(TEMPLATES["xverse-moe"], tok.bos_token, tok.eos_token, "xverse-moe")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name?"},
            {"role": "assistant", "content": "moekit"}]
    ids, mask = chat_encoder(tok, fmt)(msgs)
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    # context: each prompt as generation would see it; trained: each reply with the end-of-turn token
    want_ids = (enc("system: Be brief.\nuser: Hi\nassistant: ") + enc("Hello!<|endoftext|>")
                + enc("user: Name?\nassistant: ") + enc("moekit<|endoftext|>"))
    want_mask = [0] * len(enc("system: Be brief.\nuser: Hi\nassistant: ")) + [1] * len(enc("Hello!<|endoftext|>")) \
        + [0] * len(enc("user: Name?\nassistant: ")) + [1] * len(enc("moekit<|endoftext|>"))
    assert ids == want_ids and mask == want_mask
    assert ids[len(mask) - 1] == tok.eos_token_id and mask[-1] == 1
