"""The CUDA-graph step runner (moekit/engine/cuda_graph.py) against the eager engine.

Off CUDA, ``Engine(model, cuda_graph=True)`` runs the very same fixed-shape decode step (static
inputs padded to a batch-size bucket, padding rows on the scratch block, full-width block
tables) without capturing it, so everything but the capture is checked here; the ``gpu`` tests
capture real graphs.
"""

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig, RopeScaling
from moekit.engine import Engine, SamplingParams
from moekit.models import MoEDecoder


def tiny(kernels="reference", device="cpu", dtype=torch.float32, rope_scaling=None):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_width=16, shared_width=16),
                      max_position_embeddings=512, eos_token_id=2, rope_scaling=rope_scaling)
    model = MoEDecoder(cfg, kernels=kernels, device=device)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(1))
    return model.to(device=device, dtype=dtype).eval()


PROMPTS = [[5, 9, 11, 3], [7, 1], [4, 4, 4, 4, 4, 6]]


def run(engine, params):
    return [(c.token_ids, c.finish_reason) for c in engine.generate(PROMPTS, params)]


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True),
    [SamplingParams(max_new_tokens=n, temperature=0) for n in (3, 7, 1)],
    SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=4, repetition_penalty=1.3),
    SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=(7, 9, 11, 13), min_new_tokens=2),
])
def test_graph_steps_match_eager(params):
    model = tiny()
    eager, graphs = Engine(model, cuda_graph=False), Engine(model, cuda_graph=True)
    assert graphs.graphs is not None and not graphs.graphs.capture
    assert run(graphs, params) == run(eager, params)
    assert graphs.graphs._steps  # decode steps did run through the fixed-shape runner


def test_buckets_pad_rows_onto_the_scratch_block():
    """3 requests run in the 4-row bucket; later a 5th joins (8-row bucket): results are unchanged."""
    model = tiny()
    engine = Engine(model, cuda_graph=True, max_num_seqs=8)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS]
    got = {i: [] for i in ids}
    for step in range(40):
        if step == 2:
            extra = [engine.add_request(p, params) for p in ([9, 9, 1], [3])]
            got.update({i: [] for i in extra})
        for ev in engine.step():
            got[ev.index].append(ev.token_id)
        if not engine.has_unfinished():
            break
    assert set(engine.graphs._steps) >= {4, 8}
    want = Engine(model, cuda_graph=False).generate(PROMPTS + [[9, 9, 1], [3]], params)
    assert [got[i] for i in ids + extra] == [c.token_ids for c in want]
    assert engine.pool.in_use() == 0


def test_dynamic_rope_stays_eager():
    model = tiny(rope_scaling=RopeScaling("dynamic", 2.0))
    assert Engine(model, cuda_graph=True).graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_graph_decode_equals_reference_decode(dtype):
    """Triton kernels + captured CUDA graphs vs the reference kernels decoding eagerly."""
    fast = Engine(tiny("triton", "cuda", dtype))
    slow = Engine(tiny("reference", "cuda", dtype), cuda_graph=False)
    assert fast.graphs is not None and fast.graphs.capture
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    got, want = run(fast, params), run(slow, params)
    if dtype == torch.float32:
        assert got == want
    else:  # bf16 rounding may flip a near-tie late in a sequence; the first tokens must agree
        assert [t[:4] for t, _ in got] == [t[:4] for t, _ in want]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_xverse_sized_decode_with_graphs_equals_reference():
    """XVERSE-MoE-A4.2B's real widths (2 of its 28 layers), float32: Triton + CUDA graphs = reference, eager."""
    import moekit

    cfg = moekit.preset("xverse-moe-a4.2b").replace(num_layers=2)
    outs = []
    for kernels, graphs in (("triton", True), ("reference", False)):
        model = MoEDecoder(cfg, kernels=kernels, device="cuda")
        model.init_weights(std=0.02, generator=torch.Generator().manual_seed(5))
        engine = Engine(model.to("cuda").eval(), cuda_graph=graphs)
        assert (engine.graphs is not None and engine.graphs.capture) == graphs
        prompts = [[11, 22, 33, 44, 55], [7, 8], [99] * 9]
        params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
        outs.append([c.token_ids for c in engine.generate(prompts, params)])
        del engine, model
        torch.cuda.empty_cache()
    assert outs[0] == outs[1]
