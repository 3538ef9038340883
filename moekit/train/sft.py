"""Document encoders for training data: plain text, and chat conversations with a loss mask.

A conversation is rendered with the model's chat format and tokenised piece by piece: the
prompt pieces (system, user turns, the assistant prefix) are context, and each assistant
reply (with the end-of-turn token the format appends) is trained. Each render of
messages[:i] must be a prefix of the render of messages[:i+1], as it is for every built-in
format; templates that rewrite earlier turns are refused with a clear error.
"""

from __future__ import annotations

from moekit.chat import ChatError, ChatFormat, check_messages
from moekit.tokenizer import Tokenizer


def text_encoder(tokenizer: Tokenizer):
    """doc -> (ids ending with EOS, None); BOS as the tokenizer adds it."""
    eos = tokenizer.eos_token_id

    def encode(doc: str):
        ids = tokenizer.encode(doc)
        return (ids + [eos] if eos is not None else ids), None

    return encode


def chat_encoder(tokenizer: Tokenizer, fmt: ChatFormat):
    """messages -> (ids, mask) with mask 1 on assistant replies only."""

    def encode(messages):
        messages = check_messages(messages)
        ids, mask, done = [], [], ""

        def add(text: str, trained: bool) -> None:
            piece = tokenizer.encode(text, add_special_tokens=False) if text else []
            ids.extend(piece)
            mask.extend([int(trained)] * len(piece))

        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = fmt.render(messages[:i], add_generation_prompt=True)
            full = fmt.render(messages[:i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ChatError(f"chat format {fmt.name!r} does not render conversations incrementally; "
                                "it cannot mark assistant tokens for training")
            add(prompt[len(done):], False)
            add(full[len(prompt):], True)
            done = full
        if not any(mask):
            raise ChatError("a training conversation needs at least one assistant message")
        return ids, mask

    return encode
