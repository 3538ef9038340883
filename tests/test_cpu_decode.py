"""The fused decode step (moekit/kernels/cpu_decode.py, cpu/decode.cpp) against the per-op forward.

The fused step runs the per-op path's kernels in the same order with the same arguments, so an
engine using it must produce the very same logits: tokens and log-probabilities are compared
exactly, for every family, in float32 and bfloat16, plain and quantised, and against the plain
PyTorch reference backend within float32 rounding.
"""

import pytest
import torch

import moekit
from moekit.engine import Engine, SamplingParams
from moekit.kernels import cpu
from tests.conftest import CASE_IDS

pytestmark = pytest.mark.skipif(not cpu.supported(), reason="the C++ kernels need an x86-64 CPU with AVX-512")

PROMPTS = [[5, 9, 11, 3], [7, 1], [4, 4, 4, 4, 4, 6, 8, 10, 12]]


def engine(model, **kw):
    return Engine(model, max_num_seqs=8, kv_cache_bytes=1 << 22, block_size=4, adapt_threads=False, **kw)


def run(eng, n=6):
    """Greedy tokens and their top-3 log-probabilities, three requests decoding together."""
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, logprobs=3))
    return [(c.token_ids, [(lp.logprob, lp.top) for lp in c.logprobs]) for c in out]


def fused_and_per_op(model, n=6):
    fused, plain = engine(model), engine(model, fused_decode=False)
    assert fused.decode_path.startswith("fused"), fused.decode_path
    assert plain.decode_path == "per-op forward"
    return run(fused, n), run(plain, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_fused_decode_is_the_per_op_forward(case, dtype, checkpoints):
    model = moekit.load(checkpoints(case)[0], dtype=dtype, kernels="cpu", progress=False)
    fused, plain = fused_and_per_op(model)
    assert fused == plain


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("case", ["mixtral", "xverse", "deepseek", "qwen2_moe", "llama-tied"])
def test_fused_decode_quantised(case, fmt, group, checkpoints):
    model = moekit.load(checkpoints(case)[0], dtype=torch.bfloat16, kernels="cpu", quantize=fmt, group=group,
                        progress=False)
    assert model.quant is not None
    fused, plain = fused_and_per_op(model)
    assert fused == plain


@pytest.mark.parametrize("case", ["mixtral", "xverse", "llama_moe", "qwen2_moe", "orion"])
def test_fused_decode_matches_the_reference_backend(case, checkpoints):
    """The oracle chain's last link: float32 fused steps against plain PyTorch, within rounding."""
    folder = checkpoints(case)[0]
    fused = run(engine(moekit.load(folder, dtype=torch.float32, kernels="cpu", progress=False)))
    ref_model = moekit.load(folder, dtype=torch.float32, kernels="reference", progress=False)
    ref = engine(ref_model)
    assert ref.fused is None and ref.decode_path == "per-op forward"
    for (tok_f, lp_f), (tok_r, lp_r) in zip(fused, run(ref)):
        assert tok_f == tok_r
        assert max(abs(a[0] - b[0]) for a, b in zip(lp_f, lp_r)) < 1e-4


def test_fused_decode_steps_aside_when_it_must(checkpoints):
    """Recorded routing and batches over MAX_TOKENS run the model's own forward; results are unchanged."""
    from moekit.kernels import cpu_decode

    model = moekit.load(checkpoints("mixtral")[0], dtype=torch.float32, kernels="cpu", progress=False)
    eng = engine(model)
    assert eng.fused.applies(1) and eng.fused.applies(cpu_decode.MAX_TOKENS)
    assert not eng.fused.applies(cpu_decode.MAX_TOKENS + 1)
    with model.record_routing() as routing:
        assert not eng.fused.applies(1)
        recorded = run(eng, n=3)
    assert len(routing) >= 3 * model.config.num_layers  # every decode step went through the MoE modules
    assert recorded == run(engine(model), n=3)  # a fresh engine: no prefix-cache hits


def test_fused_decode_refuses_with_a_reason(checkpoints):
    folder = checkpoints("mixtral")[0]
    model = moekit.load(folder, dtype=torch.float16, kernels="reference", progress=False)
    assert engine(model).decode_path == "per-op forward"  # the reference backend has no fused step
    model = moekit.load(folder, dtype=torch.bfloat16, kernels="cpu", progress=False)
    model.layers[0].attn.wo = torch.nn.Parameter(model.layers[0].attn.wo.detach().t().contiguous().t())
    eng = engine(model)
    assert eng.fused is None and "layer 0: non-contiguous weight" in eng.decode_path


def test_fused_step_names_bad_input(checkpoints):
    model = moekit.load(checkpoints("mixtral")[0], dtype=torch.float32, kernels="cpu", progress=False)
    eng = engine(model)
    good = dict(ids=[3], pos=[0], slots=[4], table=[[0]], lens=[1], kv=eng.kv)
    with torch.inference_mode():
        logits, best = eng.fused(**good)
        assert logits.shape == (1, model.config.vocab_size) and best == [int(logits[0].argmax())]
        for bad, match in [(dict(slots=[10**9]), "slot outside the pool"),
                           (dict(ids=[10**9]), "token id outside the vocabulary"),
                           (dict(lens=[1, 1]), "one entry a token"),
                           (dict(table=[[-1]]), "block table entries")]:
            with pytest.raises(RuntimeError, match=match):
                eng.fused(**{**good, **bad})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_step_argmax_is_torch_argmax(dtype, checkpoints):
    """The step's argmax, greedy sampling's token, takes the first of tied maxima and a NaN as the maximum,
    as torch.argmax does: rows 5 and 7 of the LM head are equal, 11 and 13 their negation, the rest zero."""
    model = moekit.load(checkpoints("mixtral")[0], dtype=dtype, kernels="cpu", progress=False)
    w = model.output_weight
    with torch.no_grad():
        v = w[2].clone()
        w.zero_()
        w[5], w[7], w[11], w[13] = v, v, -v, -v
    eng = engine(model)
    step = dict(ids=[3, 8, 1], pos=[0, 0, 0], slots=[4, 8, 12], table=[[1], [2], [3]], lens=[1, 1, 1], kv=eng.kv)
    with torch.inference_mode():
        logits, best = eng.fused(**step)
        assert best == logits.float().argmax(-1).tolist() and set(best) <= {5, 11}
        with torch.no_grad():
            w[9] = float("nan")
        logits, best = engine(model).fused(**step)
        assert logits.float()[:, 9].isnan().all() and best == logits.float().argmax(-1).tolist() == [9, 9, 9]
