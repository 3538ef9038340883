"""transformers' continuous batching (the manager behind ``transformers serve --continuous-batching``) serving
a bench/serving_trace.py workload, for bench/cpu_engine.py."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from serving_trace import Trace, Workload, new_trace, progress, warmup_prompts


def load_transformers(folder: Path, args):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation=args.hf_attn,
        experts_implementation=args.hf_experts).eval()


def serve_transformers(model, wl: Workload, args, notes: list[str]) -> Trace:
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.utils import is_psutil_available

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    token_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    page = 256  # ContinuousBatchingConfig's default page_size
    # On a CPU transformers sizes its cache from psutil's RSS and RAM (60% of what is free), or without psutil
    # from the NUMA node's whole size, and allocates it zeroed: num_blocks gives it the same budget as moekit.
    cb = ContinuousBatchingConfig(num_blocks=int(args.kv_gib * 2**30) // (page * token_bytes),
                                  max_batch_tokens=args.hf_max_batch_tokens or args.max_num_batched_tokens,
                                  max_requests_per_batch=args.max_num_seqs)
    if not is_psutil_available():
        notes.append("psutil is not installed: transformers CB then logs 'Cannot get memory breakdown on CPU without "
                     "psutil: please install psutil.' and counts the whole NUMA node as free (left to size its cache "
                     "itself it would take 60% of it, zeroed; where the node's size cannot be read it fails with "
                     "'MemoryError: Memory footprint ... is more than available memory 0'). num_blocks was set here.")
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(wl.max_new), eos_token_id=-1, pad_token_id=0)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    mgr.start()
    status = mgr.background_thread_status

    def result(timeout: float):
        r = mgr.get_result(timeout=timeout)
        if status.fatal_error is not None:
            raise RuntimeError(f"transformers CB failed: {status.fatal_error!r}")
        if r is not None and r.error is not None:
            raise RuntimeError(f"transformers CB request {r.request_id} failed: {r.error}")
        return r

    tr, n, nxt, done = new_trace("transformers CB", wl), len(wl.prompts), 0, 0
    try:
        warm = {f"warmup{k}" for k in range(3)}
        for rid, p in zip(sorted(warm), warmup_prompts(wl)):
            mgr.add_request(p, request_id=rid, max_new_tokens=4, eos_token_id=-1)
        while warm:
            if (r := result(1.0)) is not None and r.is_finished():
                warm.discard(r.request_id)
        kv_alloc = mgr.batch_processor.cache.cache_tensor.numel()
        with progress(tr.name, wl, unit="req") as bar:
            t0 = time.perf_counter()
            while done < n:
                now = time.perf_counter() - t0
                while nxt < n and wl.arrivals[nxt] <= now:
                    mgr.add_request(wl.prompts[nxt], request_id=str(nxt), max_new_tokens=wl.max_new[nxt],
                                    record_timestamps=True, eos_token_id=-1)
                    nxt += 1
                wait = wl.arrivals[nxt] - now if nxt < n else 1.0
                r = result(min(max(wait, 1e-3), 1.0))
                if r is None or not r.is_finished():
                    continue
                i = int(r.request_id)
                tr.tokens[i], tr.times[i] = list(r.generated_tokens), [s - t0 for s in r.timestamps]
                done += 1
                bar.update(1)
            tr.wall = time.perf_counter() - t0
    finally:
        mgr.stop(block=True, timeout=60)
    tr.extra = {"kv_pool_bytes": kv_alloc, "attn_implementation": model.config._attn_implementation,
                "experts_implementation": args.hf_experts, "max_batch_tokens": cb.max_batch_tokens}
    return tr
