"""Shared by the expert-offload tests: the tightest budget a checkpoint loads in, and the check that an
offloaded model computes exactly what the in-memory one does."""

import torch

import moekit

GIB = 2**30


def tight_budget(folder, spare_experts: int = 1, **kw) -> float:
    """GiB for the resident weights plus the smallest cache the loader accepts (+ spare experts)."""
    probe = moekit.load(folder, max_memory=64, **kw)
    st, m, layers = probe.offload.stats, probe.config.moe, len(probe.offload.experts) // probe.config.moe.num_experts
    per = st.expert_bytes // (layers * m.num_experts)
    return (st.resident_bytes + st.working_bytes + st.buffer_bytes + (max(m.top_k * layers, m.num_experts) + spare_experts) * per) / GIB


def naive_greedy(model, ids, steps):
    """Full recompute per step: (tokens, logits of each step)."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids)
            out.append(logits)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids, out


def assert_same_as_in_memory(ref, off, input_ids):
    """Greedy tokens and every step's logits (full recompute), then the engine's tokens and logprobs, equal
    bit for bit; the cache missed, hit and evicted on the way."""
    ids_ref, logits_ref = naive_greedy(ref, input_ids, 4)
    ids_off, logits_off = naive_greedy(off, input_ids, 4)
    assert torch.equal(ids_ref, ids_off)
    assert all(torch.equal(a, b) for a, b in zip(logits_ref, logits_off))
    params = moekit.SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    prompts = input_ids.tolist()
    a = moekit.Engine(ref, adapt_threads=False).generate(prompts, params)  # a fixed thread count: same reductions
    b = moekit.Engine(off, adapt_threads=False).generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    st = off.offload_stats()
    assert st["misses"] > 0 and st["evictions"] > 0 and st["hits"] > 0
    smallest = min(sum(source.nbytes for source, _ in x.reads) for x in off.offload.experts.values())
    assert st["bytes_read"] >= st["misses"] * smallest > 0
    assert off.offload.pool.free_bytes >= 0 and off.offload.pool.capacity == st["capacity_bytes"]
