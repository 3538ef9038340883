"""The user-facing model object: ``generate`` and ``chat`` as the seed model cards call them.

    lm = moekit.CausalLM.from_pretrained("path/to/XVERSE-MoE-A4.2B-Chat", dtype="bfloat16")
    tokenizer = lm.tokenizer
    inputs = tokenizer("北京的景点：", return_tensors="pt").input_ids
    ids = lm.generate(inputs, max_new_tokens=64, eos_token_id=tokenizer.eos_token_id, repetition_penalty=1.1)
    print(tokenizer.batch_decode(ids, skip_special_tokens=True))
    print(lm.chat(lm.tokenizer, [{"role": "user", "content": "Hello"}]))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from moekit.chat import ChatFormat
from moekit.engine.engine import Engine
from moekit.engine.sampling import SamplingParams
from moekit.engine.text import TextGenerator
from moekit.errors import MoekitError
from moekit.models import MoEDecoder
from moekit.tokenizer import Tokenizer

# generation_config.json keys that map onto SamplingParams (transformers' names)
GEN_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")
log = logging.getLogger("moekit")


class CausalLM:
    """A model, its tokenizer and chat format, with Hugging Face-style ``generate`` and a ``chat`` call."""

    def __init__(self, model: MoEDecoder, tokenizer: Tokenizer | None = None, chat_format: str | None = None,
                 generation_config: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.generation_config = dict(generation_config or {})
        eos = set()
        for v in (model.config.eos_token_id, self.generation_config.get("eos_token_id"),
                  tokenizer.eos_token_id if tokenizer else None):
            eos |= set(v) if isinstance(v, (list, tuple)) else {v} if v is not None else set()
        self.eos_token_ids = sorted(eos)
        self._engine: Engine | None = None
        self._chat_format_name = chat_format
        self._chat_format: ChatFormat | None = None
        self._clamp_noted = False

    @property
    def engine(self) -> Engine:
        """The engine behind generate / chat (built on first use; assign one to choose its knobs)."""
        if self._engine is None:
            self._engine = Engine(self.model, eos_token_ids=self.eos_token_ids)
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine = engine

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None, device: str = "cpu", kernels: str = "auto",
                        chat_format: str | None = None, progress: bool | None = None, quantize: str | None = None,
                        group: int | None = None, max_memory: float | None = None) -> CausalLM:
        """Model, tokenizer and generation defaults of a checkpoint folder (``quantize``: ``int8`` /
        ``int4`` weights at load time; ``max_memory``: a budget in GiB, routed experts read from the
        files on demand; see :func:`moekit.load`)."""
        from moekit.weights import load

        path = Path(path)
        model = load(path, dtype=dtype, device=device, kernels=kernels, progress=progress, quantize=quantize,
                     group=group, max_memory=max_memory)
        gen_file = path / "generation_config.json"
        try:
            gen = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.exists() else {}
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
            raise MoekitError(f"{gen_file}: not a readable JSON file ({e})") from None
        if not isinstance(gen, dict):
            raise MoekitError(f"{gen_file}: holds a {type(gen).__name__}, not a JSON object")
        return cls(model, Tokenizer.from_pretrained(path), chat_format, gen)

    @property
    def chat_format(self) -> ChatFormat:
        if self._chat_format is None:
            if self.tokenizer is None:
                raise ValueError("chat needs a tokenizer")
            self._chat_format = ChatFormat.for_model(self.tokenizer, self.model.config.family, self._chat_format_name)
        return self._chat_format

    def sampling(self, prompt_tokens: int | None = None, **kw) -> SamplingParams:
        """SamplingParams from generation_config.json defaults overridden by keyword arguments.

        With ``prompt_tokens``, a default ``max_new_tokens`` (generation_config.json's, or
        SamplingParams') is clamped to the room the context leaves (XVERSE-MoE publishes 20480
        for an 8192 context); an explicit ``max_new_tokens`` is kept, and the engine refuses it
        if it does not fit.
        """
        base = {k: self.generation_config[k] for k in GEN_KEYS if self.generation_config.get(k) is not None}
        if not self.generation_config.get("do_sample", True):
            base["temperature"] = 0.0
        explicit = kw.get("max_new_tokens") is not None
        base.update({k: v for k, v in kw.items() if v is not None})
        if isinstance(base.get("stop_token_ids"), int):
            base["stop_token_ids"] = (base["stop_token_ids"],)
        params = SamplingParams(**base)
        cfg = self.model.config
        if prompt_tokens is None or explicit or cfg.rope_scaling is not None:
            return params
        room = cfg.max_position_embeddings - prompt_tokens
        if 1 <= room < params.max_new_tokens:
            if not self._clamp_noted:
                source = "generation_config.json" if "max_new_tokens" in base else "the default"
                log.warning("max_new_tokens=%d (%s) does not fit the context: %d prompt tokens of %d leave room for "
                            "%d; generating at most that many (pass max_new_tokens / --max-new-tokens to choose)",
                            params.max_new_tokens, source, prompt_tokens, cfg.max_position_embeddings, room)
                self._clamp_noted = True
            params = SamplingParams(**{**base, "max_new_tokens": room})
        return params

    def prompt_budget(self, max_new_tokens: int | None = None) -> int | None:
        """Prompt tokens a chat may use: the context less an explicit ``max_new_tokens``; with the default,
        at least half the context (XVERSE's ``_build_chat_input`` rule). None when RoPE scaling lifts the limit."""
        cfg = self.model.config
        if cfg.rope_scaling is not None:
            return None
        ctx = cfg.max_position_embeddings
        if max_new_tokens is not None:
            return ctx - max_new_tokens
        default = self.generation_config.get("max_new_tokens") or SamplingParams().max_new_tokens
        return max(ctx // 2, ctx - default)

    # -- transformers-style generate -----------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int | None = None,
                 max_length: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 50, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 eos_token_id=None, pad_token_id: int | None = None, seed: int | None = None,
                 **unsupported) -> torch.Tensor:
        """Prompt + generated ids [B, T + n], rows padded with ``pad_token_id`` after they finish.

        Greedy unless ``do_sample`` (transformers' default); ``attention_mask`` marks
        left or right padding in ``input_ids``.
        """
        if unsupported:
            raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unsupported))}")
        ids = torch.as_tensor(input_ids)
        ids = ids[None] if ids.dim() == 1 else ids
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        prompts = [row[m].tolist() for row, m in zip(ids, mask)]
        if max_new_tokens is None:
            max_new_tokens = (max_length - ids.shape[1]) if max_length is not None else 20
        eos = eos_token_id if eos_token_id is not None else list(self.engine.eos_token_ids)
        eos = (eos,) if isinstance(eos, int) else tuple(eos)
        params = SamplingParams(max_new_tokens=max(1, max_new_tokens), temperature=temperature if do_sample else 0.0,
                                top_k=top_k if do_sample else 0, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, stop_token_ids=eos, ignore_eos=True,
                                seed=seed)
        outs = self.engine.generate(prompts, params)
        cfg_pad = self.model.config.pad_token_id
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else cfg_pad if cfg_pad is not None else 0)
        width = max(len(o.token_ids) for o in outs)
        gen = torch.full((len(outs), width), pad, dtype=torch.long)
        for b, o in enumerate(outs):
            gen[b, :len(o.token_ids)] = torch.tensor(o.token_ids)
        return torch.cat([ids.cpu(), gen], dim=1)

    # -- text ---------------------------------------------------------------------------------
    def complete(self, prompt: str, stream: bool = False, **sampling) -> str | Iterator[str]:
        """Continue ``prompt``; a string, or a generator of text deltas with ``stream=True``."""
        ids = self.tokenizer.encode(prompt)
        return self._text(ids, self.sampling(len(ids), **sampling), stream)

    def chat(self, tokenizer: Tokenizer | None, messages, stream: bool = False, streaming: bool | None = None,
             **sampling) -> str | Iterator[str]:
        """Reply to OpenAI-style ``messages``: a string, or a generator of text deltas when streaming.

        The oldest rounds are dropped when the conversation outgrows :meth:`prompt_budget`.
        ``streaming`` is accepted as Orion's card spells it.
        """
        tok = tokenizer or self.tokenizer
        ids = self.chat_format.encode(tok, messages, max_tokens=self.prompt_budget(sampling.get("max_new_tokens")))
        return self._text(ids, self.sampling(len(ids), **sampling), stream if streaming is None else streaming)

    def _text(self, ids: list[int], params: SamplingParams, stream: bool):
        gen = TextGenerator(self.engine, self.tokenizer)
        if stream:
            return (ev.text for ev in gen.stream([ids], params) if ev.text)
        return gen.generate([ids], params)[0].text
