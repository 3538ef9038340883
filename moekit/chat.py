"""Chat formats: each family's built-in format as a Jinja template, rendered like transformers does.

A ``chat_template`` in the checkpoint's tokenizer_config.json takes precedence;
otherwise the family's own format is used (sources in docs/generation.md).

A template may cut its output into pieces with ``{{ piece }}``: each piece is then
tokenised on its own and the ids are concatenated (per-piece encoding), as a model's
own prompt builder does when it calls ``tokenizer.encode`` once per fragment. An
assistant message may carry ``token_ids`` (the ids the model produced): where its
content is a piece of its own, those ids are used verbatim.

- xverse-moe: XVERSE-MoE-Chat's ``_build_chat_input``, per piece: ``system: `` | ``S\\n``,
  ``user: `` | ``U\\n``, past replies ``assistant: `` | ``R`` | eos, prompt ends ``assistant: ``.
- chatml: ``<|im_start|>role\\n..<|im_end|>\\n`` (APUS-xDAN with llama.cpp ``--chatml``, Qwen).
- orion: ``<s>Human: ..\\n\\nAssistant: </s>..</s>``; a system message is merged into the first user turn.
- vicuna: Vicuna v1.1 as LLaMA-MoE's SFT code builds it (``smoe/utils/conversation.py``).
- deepseek: ``User: ..\\n\\nAssistant: ..<eos>``.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from moekit.errors import MoekitError

log = logging.getLogger("moekit")
PIECE = "\ue000moekit:piece\ue000"  # rendered for {{ piece }}; never inside message content
REPLY = "\ue001"  # brackets a placeholder for an assistant message's token_ids while rendering

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

TEMPLATES = {
    "xverse-moe": (
        "{% for m in messages %}"
        "{% if m.role == 'system' %}{% if not loop.first %}"
        "{{ raise_exception('a system message must be the first message (XVERSE _build_chat_input)') }}{% endif %}"
        "{{ 'system: ' + piece + m.content + '\\n' + piece }}"
        "{% elif m.role == 'user' %}{{ 'user: ' + piece + m.content + '\\n' + piece }}"
        "{% elif m.role in ('exec', 'tool') %}{{ 'exec: ' + piece + m.content + '\\n' + piece }}"
        "{% elif m.role == 'assistant' %}{{ 'assistant: ' + piece + m.content + piece + eos_token + piece }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "orion": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m.role == 'system' %}{% set ns.system = m.content + '\\n\\n' %}"
        "{% elif m.role == 'user' %}{{ 'Human: ' + ns.system + m.content + '\\n\\nAssistant: ' + eos_token }}"
        "{% set ns.system = '' %}"
        "{% elif m.role == 'assistant' %}{{ m.content + eos_token }}"
        "{% endif %}{% endfor %}"),
    "vicuna": (
        "{{ bos_token }}{% if messages[0].role == 'system' %}{{ messages[0].content }}"
        "{% else %}{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + "' }}{% endif %}{{ ' ' }}"
        "{% for m in messages %}"
        "{% if m.role == 'user' %}{{ 'USER: ' + m.content + ' ' }}"
        "{% elif m.role == 'assistant' %}{{ 'ASSISTANT: ' + m.content + eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    "deepseek": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role == 'system' %}{{ m.content + '\\n\\n' }}"
        "{% elif m.role == 'user' %}{{ 'User: ' + m.content + '\\n\\n' }}"
        "{% elif m.role == 'assistant' %}{{ 'Assistant: ' + m.content + eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"),
}

FAMILY_FORMATS = {"xverse": "xverse-moe", "mixtral": "chatml", "orion": "orion", "llama_moe": "vicuna",
                  "qwen2_moe": "chatml", "deepseek": "deepseek"}

ROLES = ("system", "user", "assistant", "exec", "tool")


class ChatError(MoekitError):
    """A chat request cannot be rendered; the message names the message or the template."""


@lru_cache(maxsize=32)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatError(f"chat template does not compile: {e}") from None


def check_messages(messages) -> list[dict]:
    """Validate OpenAI-style messages: a list of {role, content} with string content."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError("messages: a non-empty list of {'role', 'content'} objects is needed")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError(f"messages[{i}]: needs 'role' and 'content'")
        content = m["content"]
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ChatError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p.get("text", "") for p in content)
        if m["role"] not in ROLES:
            raise ChatError(f"messages[{i}].role={m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string")
        if PIECE in content or REPLY in content:
            raise ChatError(f"messages[{i}].content contains moekit's private-use marker {PIECE!r} or {REPLY!r}")
        out.append({**m, "content": content})
    return out


class ChatFormat:
    """A chat template (Jinja) plus the special-token strings it is rendered with."""

    def __init__(self, template: str, bos_token: str = "<s>", eos_token: str = "</s>", name: str = "custom"):
        self.template, self.name = template, name
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    @classmethod
    def for_model(cls, tokenizer, family: str | None = None, name: str | None = None) -> ChatFormat:
        """``name`` if given, else the tokenizer's chat_template, else the family's built-in format."""
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
        if name is None and tokenizer.chat_template:
            return cls(tokenizer.chat_template, bos, eos, "tokenizer_config.json")
        fallback = name is None
        name = name or FAMILY_FORMATS.get(family or "")
        if name not in TEMPLATES:
            raise ChatError(f"no chat format for this model: the tokenizer has no chat_template and family "
                            f"{family!r} has no built-in format; choose one of {', '.join(TEMPLATES)}")
        if fallback and name == "chatml" and tokenizer.token_to_id("<|im_start|>") is None:
            log.warning("chat format: this %s checkpoint has no chat_template and <|im_start|> is not a token of "
                        "its vocabulary, so the fallback ChatML markers are encoded as plain text; pass "
                        "--chat-format (chat_format=) or add a chat_template to tokenizer_config.json", family)
        return cls(TEMPLATES[name], bos, eos, name)

    def _render(self, messages, add_generation_prompt: bool, **kwargs) -> str:
        from jinja2 import TemplateError

        try:
            return _compile(self.template).render(messages=messages, bos_token=self.bos_token,
                                                  eos_token=self.eos_token, piece=PIECE,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)
        except TemplateError as e:
            raise ChatError(f"chat template ({self.name}) failed: {e}") from None

    def render(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt as one string (piece boundaries removed)."""
        return self._render(check_messages(messages), add_generation_prompt, **kwargs).replace(PIECE, "")

    def encode(self, tokenizer, messages, add_generation_prompt: bool = True,
               max_tokens: int | None = None) -> list[int]:
        """Prompt ids: each piece encoded on its own, special-token strings mapped to ids, no extra BOS.

        An assistant message's ``token_ids`` replace its content where the content is a whole piece.
        ``max_tokens``: past it, whole rounds (a user/exec message and the replies after it) are
        dropped oldest first, and with them a leading system message, as XVERSE's
        ``_build_chat_input`` does; a last round that does not fit on its own is an error.
        """
        messages = check_messages(messages)
        ids = self._encode(tokenizer, messages, add_generation_prompt)
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        rest = messages[1:] if messages[0]["role"] == "system" else messages
        starts = [i for i, m in enumerate(rest) if m["role"] in ("user", "exec", "tool")]
        for kept in ([rest] if rest is not messages else []) + [rest[i:] for i in starts[1:]]:
            ids = self._encode(tokenizer, kept, add_generation_prompt)
            if len(ids) <= max_tokens:
                log.warning("chat: the conversation needs more than %d prompt tokens; dropped its first %d "
                            "message(s)", max_tokens, len(messages) - len(kept))
                return ids
        raise ChatError(f"the last message needs {len(ids)} prompt tokens, more than the {max_tokens} the "
                        f"context leaves for the prompt")

    def _encode(self, tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        messages = list(messages)
        given = {}  # placeholder -> (content, ids) of assistant messages that carry token_ids
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and m.get("token_ids") is not None:
                key = f"{REPLY}{i}{REPLY}"
                given[key] = (m["content"], [int(t) for t in m["token_ids"]])
                messages[i] = {**m, "content": key}
        ids = []
        for part in self._render(messages, add_generation_prompt).split(PIECE):
            if part in given:
                ids.extend(given[part][1])
                continue
            for key, (content, _) in given.items():  # a reply inside a larger piece is re-encoded as text
                part = part.replace(key, content)
            if part:
                ids.extend(tokenizer.encode(part, add_special_tokens=False))
        return ids
