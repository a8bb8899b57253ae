"""Turning user text into the exact string a model sees."""

from __future__ import annotations


def has_chat_template(tokenizer) -> bool:
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    return bool(getattr(tokenizer, "chat_template", None) or getattr(tok, "chat_template", None))


def render(tokenizer, text: str, chat: bool | None = None, system: str | None = None) -> str:
    """The prompt string: `text` as one user turn of the chat template (with the generation prompt)
    when `chat` is True, or None and the tokenizer has a template; else `text` unchanged.
    """
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if not use_chat:
        return text
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
