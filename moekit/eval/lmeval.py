"""lm-evaluation-harness adapter: ``MoekitLM``, an ``lm_eval`` model that scores and generates through
moekit's serving engine, and ``moekit-lm-eval``, lm-eval's own command line with the model registered.

    moekit-lm-eval --model moekit --model_args pretrained=PATH,dtype=bfloat16 --tasks hellaswag
    lm_eval.simple_evaluate(model=MoekitLM(pretrained=PATH), tasks=[...])

Requests are tokenised exactly as lm-eval's ``hf`` model (HFLM) tokenises them (``TemplateLM``'s
context/continuation split and empty-context rule, HFLM's ``tok_encode`` BOS handling, left truncation
to ``max_length``, lm-eval's rolling windows, stop-sequence cuts), so the numbers are HFLM's; every
lm-eval call is one batch through the continuous-batching engine, where shared contexts (few-shot
prompts, a question's answer options) hit the prefix cache.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

from moekit.errors import MoekitError

try:
    # lm-eval's own models first: get_model imports them only while the registry is empty
    import lm_eval.models  # noqa: F401
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import (
        handle_stop_sequences,
        has_bos_prefix,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"moekit.eval.lmeval needs lm-evaluation-harness: pip install 'moekit[eval]' ({e})") from e

log = logging.getLogger("moekit")
NAME = "moekit"  # the model name lm-eval knows this adapter by (--model moekit)
# gen_kwargs keys lm-eval tasks send that map onto SamplingParams (after normalize_gen_kwargs)
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "seed": "seed"}


class MoekitLM(TemplateLM):
    """An lm-eval model backed by a moekit checkpoint and its engine.

    pretrained: checkpoint folder; dtype: "float32", "bfloat16", "float16" or "auto" (the config's);
    device: "cpu" / "cuda" (default: CUDA when available); kernels: moekit's MoE kernels ("auto", ...);
    max_length: tokens a request may use (default: the model's context less 2, since the engine scores
    ``max_length + 1`` tokens and draws one more); max_gen_toks: default generation length (256, HFLM's);
    add_bos_token / prefix_token_id: as HFLM's; chat_format: a moekit chat format name instead of the
    checkpoint's template; max_num_seqs / max_num_batched_tokens: the engine's batch limits. lm-eval's
    ``batch_size`` / ``max_batch_size`` are accepted and ignored: the engine batches continuously.
    """

    def __init__(self, pretrained: str, dtype: str | None = "auto", device: str | None = None,
                 kernels: str = "auto", max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 chat_format: str | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 batch_size=None, max_batch_size=None, progress: bool = True, **unsupported):
        super().__init__()
        if unsupported:
            raise MoekitError(f"MoekitLM: unsupported model_args {', '.join(sorted(unsupported))}")
        import torch

        from moekit.engine import Engine
        from moekit.engine.api import CausalLM
        from moekit.eval.score import Scorer

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:
                log.warning("MoekitLM: device=%s is not available; using the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pretrained = str(pretrained)
        self.lm = CausalLM.from_pretrained(pretrained, dtype=None if dtype in (None, "auto") else dtype,
                                           device=device, kernels=kernels, chat_format=chat_format,
                                           progress=progress)
        if self.lm.tokenizer is None:
            raise MoekitError(f"{pretrained}: lm-eval needs the checkpoint's tokenizer files")
        self.tokenizer = self.lm.tokenizer
        self.lm.engine = Engine(self.lm.model, eos_token_ids=self.lm.eos_token_ids, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens)
        self.scorer = Scorer(self.lm.engine, progress=progress)
        cfg = self.lm.model.config
        room = None if cfg.rope_scaling is not None else cfg.max_position_embeddings - 2
        if max_length is not None and room is not None and int(max_length) > room:
            raise MoekitError(f"MoekitLM: max_length={max_length} leaves no room in the model's context of "
                              f"{cfg.max_position_embeddings}: a scored request takes max_length + 2 positions; "
                              f"use at most {room}")
        self._max_length = int(max_length) if max_length else room or cfg.max_position_embeddings
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.progress = progress
        self._device = torch.device(device)

    # -- what lm-eval asks of a model ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling text) is conditioned on: BOS, else EOS (HFLM's rule)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.rstrip("/").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """HFLM's rule: the tokenizer's special tokens unless told otherwise (``add_bos_token``), none when
        the text already starts with the prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if has_bos_prefix(string, self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)):
                add_special_tokens = False
        ids = self.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None
                                    else add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens, skip_special_tokens)

    # -- scoring -------------------------------------------------------------------------------------
    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """HFLM's left truncation: at most ``max_length + 1`` tokens, the continuation kept whole."""
        if not context or not continuation or len(continuation) > self.max_length:
            raise MoekitError(f"lm-eval request with {len(context)} context and {len(continuation)} continuation "
                              f"tokens: both must be non-empty and the continuation at most max_length="
                              f"{self.max_length}")
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:-len(continuation)], continuation

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether it is the greedy decode) per
        ``((context, continuation) strings or None, context ids, continuation ids)``, in one engine batch."""
        if not requests:
            return []
        pairs = [self._window(list(ctx), list(cont)) for _, ctx, cont in requests]
        self.scorer.progress = self.progress and not disable_tqdm
        scored = self.scorer.loglikelihood(pairs, desc="moekit loglikelihood")
        out = []
        for (key, _, _), s in zip(requests, scored):
            answer = (float(s.logprob), bool(s.greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text loglikelihoods in lm-eval's disjoint rolling windows of ``max_length`` tokens, the first
        conditioned on the prefix token; all windows of all texts in one engine batch."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------------
    def _gen_kwargs(self, gen_kwargs) -> tuple[dict, list[str], int]:
        """(sampling keyword arguments, stop strings, max_gen_toks) of one request, as HFLM reads them."""
        if not isinstance(gen_kwargs, dict):
            raise MoekitError(f"generate_until: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
        kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kw.pop("until", None), eos=self.tok_decode(self.eot_token_id, False))
        max_gen = int(kw.pop("max_gen_toks"))
        if max_gen >= self.max_length:
            raise MoekitError(f"generate_until: max_gen_toks={max_gen} leaves no room for the context in "
                              f"max_length={self.max_length}")
        return kw, until, max_gen

    def _params(self, kw: dict, until: list[str], new_tokens: int):
        """SamplingParams as transformers' generate would sample: greedy unless ``do_sample``; the
        checkpoint's generation_config.json defaults (and transformers' top_k=50) when sampling."""
        kw = dict(kw)
        do_sample = kw.pop("do_sample", False)
        explicit = {SAMPLING_KEYS[k]: v for k, v in kw.items() if k in SAMPLING_KEYS}
        ignored = sorted(set(kw) - set(SAMPLING_KEYS) - {"max_length"})
        if ignored:
            log.warning("MoekitLM.generate_until: ignoring gen_kwargs %s", ", ".join(ignored))
        if do_sample:
            explicit.setdefault("top_k", self.lm.generation_config.get("top_k", 50))
        else:
            explicit.update(temperature=0.0, top_k=0)
        return self.lm.sampling(max_new_tokens=max(1, new_tokens), stop=tuple(s for s in until if s), **explicit)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, greedy unless ``do_sample``, cut at the first stop string (the
        ``until`` list plus the EOS text), contexts left-truncated to leave ``max_gen_toks`` of room."""
        from moekit.engine.text import TextGenerator

        if not requests:
            return []
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kw, until, max_gen = self._gen_kwargs(gen_kwargs)
            bos_text = self.tokenizer.bos_token
            special = False if bos_text and has_bos_prefix(context, bos_text) else self.add_bos_token
            ids = self.tok_encode(context, add_special_tokens=True if special is None else special,
                                  left_truncate_len=self.max_length - max_gen)
            if "max_length" in kw:  # HFLM: prompt + generation
                max_gen = int(kw["max_length"]) - len(ids)
            prompts.append(ids)
            params.append(self._params(kw, until, max_gen))
            stops.append(until)
        texts = [""] * len(prompts)
        bar = tqdm(total=len(prompts), desc="moekit generate_until", unit="req", leave=False,
                   disable=disable_tqdm or not self.progress or len(prompts) < 2)
        with bar:
            for ev in TextGenerator(self.lm.engine, self.tokenizer).stream(prompts, params):
                texts[ev.index] += ev.text
                if ev.finish_reason is not None:
                    bar.update(1)
        out = []
        for req, text, until in zip(requests, texts, stops):
            text = postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    # -- chat templates ------------------------------------------------------------------------------
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The checkpoint's chat template (or the ``chat_format`` model arg's), None when disabled."""
        if chat_template is False or chat_template is None:
            return None
        return self.lm.chat_format.template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``chat_history`` in the checkpoint's chat format. Without a generation prompt
        the last message is left open (transformers' ``continue_final_message``); a template that rejects
        the system role is retried without system messages, as HFLM does."""
        from moekit.chat import ChatError

        fmt = self.lm.chat_format
        try:
            text = fmt.render(chat_history, add_generation_prompt=add_generation_prompt)
        except ChatError:
            log.warning("chat template failed; retrying without the system message(s)")
            chat_history = [m for m in chat_history if m["role"] != "system"]
            text = fmt.render(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt or not chat_history:
            return text
        final = chat_history[-1]["content"]
        at = text.rfind(final.strip())
        if not final.strip() or at < 0:
            raise MoekitError("apply_chat_template: the final message is not in the rendered chat, so it "
                              "cannot be continued")
        keep = len(final.lstrip()) if text[at:at + len(final.lstrip())] == final else len(final.strip())
        return text[:at + keep]

    def get_model_info(self) -> dict:
        cfg = self.lm.model.config
        return {"model_family": cfg.family, "model_dtype": str(self.lm.engine.dtype),
                "model_num_parameters": sum(p.numel() for p in self.lm.model.parameters())}


def register() -> None:
    """Register ``MoekitLM`` as lm-eval's ``moekit`` model (a lazy entry, so re-imports are harmless)."""
    if NAME not in model_registry:
        model_registry.register(NAME, target=f"{__name__.replace('__main__', 'moekit.eval.lmeval')}:MoekitLM")


def main() -> None:
    """``moekit-lm-eval``: lm-eval's command line (``lm_eval``'s arguments) with ``--model moekit`` available."""
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


register()

if __name__ == "__main__":
    main()
