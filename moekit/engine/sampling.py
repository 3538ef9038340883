"""Sampling parameters and the logits -> next-token step.

Shape legend: B rows, V vocabulary.

Order follows Hugging Face ``generate``: repetition penalty (prompt and output
tokens), presence/frequency penalties (output tokens, OpenAI semantics), then
temperature, top-k, top-p, min-p, and a draw from each row's own generator.
Temperature 0 means greedy (argmax after the penalties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moekit.errors import MoekitError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Every field is validated; errors name the field."""

    max_new_tokens: int = 128  # stop after this many generated tokens (finish reason "length")
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set with this cumulative probability (1 = off)
    min_p: float = 0.0  # drop tokens below min_p * p(most likely) (0 = off)
    repetition_penalty: float = 1.0  # HF: divide positive / multiply negative logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: subtract once from every generated token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end the sequence (finish reason "stop")
    stop: tuple[str, ...] = ()  # strings that end the sequence (handled on text, see moekit.engine.text)
    seed: int | None = None  # makes sampling reproducible
    ignore_eos: bool = False  # keep going past the model's end-of-sequence ids
    min_new_tokens: int = 0  # suppress stop ids until this many tokens exist
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("min_new_tokens", isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0, ">= 0"),
            ("stop", all(isinstance(s, str) and s for s in stop), "non-empty strings"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise MoekitError(f"sampling parameter {name}={getattr(self, name)!r} is invalid: must be {want}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits_BV: torch.Tensor, params: list[SamplingParams], seen_BV: torch.Tensor,
                    counts_BV: torch.Tensor) -> torch.Tensor:
    """Repetition (over prompt + output, ``seen``) and presence/frequency (over output, ``counts``)."""
    dev = logits_BV.device
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
    if bool((rep != 1).any()):
        penalised = torch.where(logits_BV > 0, logits_BV / rep, logits_BV * rep)
        logits_BV = torch.where(seen_BV, penalised, logits_BV)
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    if bool((pres != 0).any() or (freq != 0).any()):
        logits_BV = logits_BV - pres * (counts_BV > 0) - freq * counts_BV
    return logits_BV


def warp(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for one row; removed tokens get -inf."""
    x = logits_V / p.temperature
    if 0 < p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, -math.inf)
    if p.top_p < 1:
        sorted_x, order = torch.sort(x, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_x.softmax(-1)) >= p.top_p  # mass before this token already reaches p
        drop_sorted[0] = False
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), -math.inf)
    if p.min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), -math.inf)
    return x


def sample(logits_BV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           seen_BV: torch.Tensor, counts_BV: torch.Tensor, suppress: list[tuple[int, ...]] | None = None
           ) -> torch.Tensor:
    """Next token for every row [B] from last-position logits."""
    logits_BV = apply_penalties(logits_BV.float(), params, seen_BV, counts_BV)
    if suppress:
        for b, ids in enumerate(suppress):
            if ids:
                logits_BV[b, list(ids)] = -math.inf
    out = torch.empty(len(params), dtype=torch.long, device=logits_BV.device)
    for b, p in enumerate(params):
        if p.greedy:
            out[b] = torch.argmax(logits_BV[b])
        else:
            probs = warp(logits_BV[b], p).softmax(-1)
            out[b] = torch.multinomial(probs, 1, generator=generators[b])[0]
    return out
