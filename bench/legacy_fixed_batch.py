"""The fixed-batch engine of commit 728f105, kept only as a baseline for bench/cpu_engine.py.

Shape legend: B rows still generating, P padded prompt length, V vocabulary.

A batch of prompts is left-padded and prefilled in one forward pass into a static
:class:`~moekit.engine.kv_cache.KVCache`, then decoded one token per row per step; a
finished row is dropped from the cache so later steps compute only the live rows.
Requests cannot join a batch in flight. This is that engine's loop (``Engine._steps``
at 728f105) reduced to what the benchmark runs: greedy (argmax), no stop ids, no
CUDA graphs. Its thread governor is passed in as ``tick``, as the old engine did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from moekit.engine.kv_cache import KVCache
from moekit.models import MoEDecoder


@torch.inference_mode()
def fixed_batch_steps(model: MoEDecoder, prompts: list[list[int]], max_new_tokens: list[int],
                      tick: Callable[[], object] = lambda: None, stats: dict | None = None
                      ) -> Iterator[list[tuple[int, int]]]:
    """Yield, per forward pass, the (prompt index, token id) of every row that produced a token.

    stats (optional) receives ``kv_bytes``: the static cache's size (every row holds P + max(max_new_tokens)
    slots, padding included).
    """
    cfg = model.config
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    B, P = len(prompts), max(map(len, prompts))
    pad_B = torch.tensor([P - len(p) for p in prompts], device=device)
    ids_BP = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids_BP[b, P - len(p):] = torch.tensor(p, device=device)
    cache = KVCache(cfg, B, P + max(max_new_tokens), dtype, device, pad_B)
    if stats is not None:
        stats["kv_bytes"] = cache.nbytes()
    active = list(range(B))  # prompt index of each cache row
    n_out = [0] * B
    tick()
    logits_BV = model(ids_BP, cache=cache, last_only=True)[:, -1]
    while True:
        tok_B = logits_BV.argmax(-1)
        out, keep = [], []
        for r, (i, t) in enumerate(zip(active, tok_B.tolist())):
            n_out[i] += 1
            out.append((i, t))
            if n_out[i] < max_new_tokens[i]:
                keep.append(r)
        yield out
        if not keep:
            return
        if len(keep) < len(active):
            cache.keep(keep)
            tok_B = tok_B[torch.tensor(keep, device=device)]
            active = [active[r] for r in keep]
        tick()
        logits_BV = model(tok_B[:, None], cache=cache)[:, -1]
