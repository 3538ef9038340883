"""Sampling parameters and the logits -> next-token step.

Shape legend: B rows, V vocabulary.

Order follows Hugging Face ``generate``: repetition penalty (prompt and output
tokens), presence/frequency penalties (output tokens, OpenAI semantics), then
temperature, top-k, top-p, min-p, and a draw. Temperature 0 means greedy (argmax
after the penalties). Every step is one set of tensor operations over all rows,
each row with its own parameters.

The draw is a Gumbel-max race with counter-based noise: row b's noise is a hash of
(its request's seed, the index of the token being drawn, the vocabulary id), so a
request samples the same tokens whatever else shares its batch, after a preemption
and recompute, and on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moekit.errors import MoekitError

MAX_LOGPROBS = 100  # top alternatives a request may ask for, per position
_MASK64 = (1 << 64) - 1


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
    logprobs: int | None = None  # report each new token's logprob and this many top alternatives (0 = none)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo scoring)
    prompt_logprobs_start: int = 0  # prompt tokens before this index get none (None), so cached blocks serve them
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
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"None or an integer in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                                 and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"None or an integer in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs_start", isinstance(self.prompt_logprobs_start, int) and self.prompt_logprobs_start >= 0,
             "an integer >= 0"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise MoekitError(f"sampling parameter {name}={getattr(self, name)!r} is invalid: must be {want}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether a repetition, presence or frequency penalty applies."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


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


def warp_rows(logits_BV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p, each row with its own values; removed tokens get -inf.
    Greedy rows are left unscaled (their argmax is all that is read)."""
    dev, V = logits_BV.device, logits_BV.shape[-1]
    temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    x = logits_BV / temp[:, None]
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    ps = [p.top_p for p in params]
    if any(k < V for k in ks) or any(p < 1 for p in ps):
        sx, order = torch.sort(x, dim=-1, descending=True)
        k_B1 = torch.tensor(ks, device=dev)[:, None]
        kth = sx.gather(1, k_B1 - 1)  # transformers keeps every token tied with the k-th
        keep = sx >= kth
        if any(p < 1 for p in ps):
            prob = sx.masked_fill(~keep, -math.inf).softmax(-1)
            before = prob.cumsum(-1) - prob  # mass of the tokens ranked above this one
            drop = before >= torch.tensor(ps, device=dev)[:, None]
            drop[:, 0] = False
            keep &= ~drop
        x = x.masked_fill(~torch.zeros_like(keep).scatter(1, order, keep), -math.inf)
    if any(p.min_p > 0 for p in params):
        probs = x.softmax(-1)
        min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
        x = x.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)
    return x


def warp(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """:func:`warp_rows` for one row."""
    return warp_rows(logits_V[None], [p])[0]


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int (the host side of :func:`_mix`)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): the same bits as :func:`_mix_int`."""
    x = (x ^ _srl(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _srl(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _srl(x, 31)


def draw_key(seed: int, index: int) -> int:
    """The noise key of a request's ``index``-th drawn token (int64)."""
    return _signed(_mix_int(_mix_int(seed) + index * 0x9E3779B97F4A7C15))


def gumbel(keys_B: torch.Tensor, V: int) -> torch.Tensor:
    """Standard Gumbel noise [B, V] (float32), a pure function of each row's key and the vocabulary id."""
    ids = torch.arange(V, device=keys_B.device, dtype=torch.int64) * _signed(0xD1B54A32D192ED03)
    bits = _srl(_mix(keys_B[:, None] ^ ids[None]), 11)  # 53 random bits
    u = (bits.double() + 0.5) / float(1 << 53)  # (0, 1)
    return (-torch.log(-torch.log(u))).float()


def argmax_rows(x_BV: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum [B] (int64), NaN counting as the maximum, as ``torch.argmax``; on the CPU
    through NumPy, whose argmax of an 8000-wide row takes about 4 us where torch's takes 11."""
    if x_BV.device.type == "cpu" and x_BV.dtype == torch.float32:
        return torch.from_numpy(x_BV.numpy().argmax(-1))
    return x_BV.argmax(-1)


def sample(logits_BV: torch.Tensor, params: list[SamplingParams], keys_B: torch.Tensor | None,
           seen_BV: torch.Tensor | None = None, counts_BV: torch.Tensor | None = None,
           suppress_BV: torch.Tensor | None = None) -> torch.Tensor:
    """Next token for every row [B] from last-position logits.

    keys_B: int64 noise keys (:func:`draw_key`); only read when a row samples.
    seen_BV / counts_BV: prompt+output token mask and output token counts, for the penalties.
    suppress_BV: True where a token may not be drawn (stop ids before ``min_new_tokens``).
    """
    logits_BV = logits_BV.float()
    if seen_BV is not None:
        logits_BV = apply_penalties(logits_BV, params, seen_BV, counts_BV)
    if suppress_BV is not None:
        logits_BV = logits_BV.masked_fill(suppress_BV, -math.inf)
    best = argmax_rows(logits_BV)
    if all(p.greedy for p in params):
        return best
    greedy = torch.tensor([p.greedy for p in params], device=logits_BV.device)
    scores = warp_rows(logits_BV, params).log_softmax(-1) + gumbel(keys_B, logits_BV.shape[-1])
    return torch.where(greedy, best, scores.argmax(-1))


def top_logprobs(logits_NV: torch.Tensor, chosen_N: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probabilities (log_softmax of the raw logits): of ``chosen`` [N], and the top ``n``
    alternatives (ids [N, n], logprobs [N, n], most likely first)."""
    lp = logits_NV.float().log_softmax(-1)
    top = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
    return lp.gather(1, chosen_N[:, None])[:, 0], top[1], top[0]
