"""From examples to token ids: seeded demonstrations, plain or chat prompts, answer continuations.

The same `Encoded` items feed the unpatched and the patched model, so both see
identical token ids. Demonstrations for an example are drawn from the train
split with a generator seeded by ``(seed, example id)``: the same example gets
the same demonstrations in every run, whatever else is evaluated with it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Sequence

from attnedit.prompting import has_chat_template

from .spec import TaskError, TaskSpec
from .task import Example, Task


@dataclass(frozen=True)
class Encoded:
    """One example, tokenized.

    Attributes:
        index: the example's position in the list that was encoded.
        prompt: the prompt text the model sees (demonstrations included).
        prompt_ids: its token ids.
        choice_ids: token ids of each choice's continuation (answer prefix included); empty for generation.
        image: the image path (pope), else None.
    """

    index: int
    prompt: str
    prompt_ids: list[int]
    choice_ids: list[list[int]]
    image: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max((len(c) for c in self.choice_ids), default=0)


def demonstrations(example: Example, train: Sequence[Example], shots: int, seed: int) -> list[Example]:
    """`shots` train examples for `example`, seeded by (seed, example id); never the example itself."""
    if shots <= 0:
        return []
    pool = [d for d in train if d.id != example.id or d.fields != example.fields]
    if shots > len(pool):
        raise TaskError(f"--shots {shots} is larger than the train split ({len(pool)} examples)")
    key = int(hashlib.sha256(f"{seed}:{example.id}".encode()).hexdigest()[:16], 16)
    return random.Random(key).sample(pool, shots)


def use_chat(spec: TaskSpec, tokenizer, chat: bool | None = None) -> bool:
    """Chat prompts: the caller's choice, else the spec's, else whether the tokenizer has a template."""
    if chat is not None:
        return chat
    if spec.chat is not None:
        return spec.chat
    return has_chat_template(tokenizer)


def answer_prefix(spec: TaskSpec, chat: bool) -> str:
    if spec.answer_prefix is not None:
        return spec.answer_prefix
    return "" if chat else " "


def render(
    spec: TaskSpec, example: Example, demos: Sequence[Example], tokenizer, chat: bool, image_text: str = ""
) -> str:
    """The prompt text of `example` after its demonstrations (plain text or the tokenizer's chat template)."""
    prefix = answer_prefix(spec, chat)
    intro = _fill(spec.instruction, example.fields, image_text) if spec.instruction else ""
    shown = [(_fill(spec.template, d.fields, image_text), _answer(spec, d)) for d in demos]
    query = _fill(spec.template, example.fields, image_text)
    if not chat:
        parts = ([intro] if intro else []) + [q + prefix + a for q, a in shown] + [query]
        return spec.separator.join(parts)
    messages: list[dict[str, Any]] = [{"role": "system", "content": spec.system}] if spec.system else []
    if spec.kind == "pope":  # the image goes first in the user turn, as vision chat templates expect
        body = spec.separator.join(([intro] if intro else []) + [query])
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": body}]})
    elif spec.fewshot == "inline" or not shown:  # demonstrations as plain text inside one user turn
        inline = answer_prefix(spec, False)
        body = spec.separator.join(([intro] if intro else []) + [q + inline + a for q, a in shown] + [query])
        messages.append({"role": "user", "content": body})
    else:
        for i, (q, a) in enumerate(shown):
            content = f"{intro}{spec.separator}{q}" if (i == 0 and intro) else q
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": query})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(
    task: Task,
    examples: Sequence[Example],
    tokenizer,
    *,
    shots: int = 0,
    seed: int = 0,
    chat: bool | None = None,
    image_text: str = "",
) -> list[Encoded]:
    """Tokenize every example's prompt and choice continuations.

    Args:
        task: the task (its spec and train split).
        examples: the examples to encode (usually a slice of ``task.split("test")``).
        tokenizer: a tokenizer, or a processor (its `.tokenizer` is used).
        shots: demonstrations per example, drawn from the train split.
        seed: seed of the demonstrations.
        chat: force chat prompts on/off (default: the spec, else whether the tokenizer has a template).
        image_text: what an ``{image}`` slot becomes in plain prompts (the processor's image token).
    Returns:
        One `Encoded` per example, in order.
    Raises:
        TaskError: more shots than train examples.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    spec = task.spec
    is_chat = use_chat(spec, tokenizer, chat)
    prefix = answer_prefix(spec, is_chat)
    if shots and spec.kind == "pope":
        raise TaskError(f"task {task.name!r} is a pope task: those are zero-shot (use --shots 0)")
    train = task.split("train") if shots else []
    cache: dict[str, list[int]] = {}
    out = []
    for i, ex in enumerate(examples):
        text = render(spec, ex, demonstrations(ex, train, shots, seed), tokenizer, is_chat, image_text)
        ids = tok(text, add_special_tokens=not is_chat)["input_ids"]
        choices = []
        for c in ex.choices:
            if c not in cache:
                cache[c] = tok(prefix + c, add_special_tokens=False)["input_ids"]
            choices.append(cache[c])
        out.append(Encoded(i, text, list(ids), choices, ex.fields.get("image") if spec.kind == "pope" else None))
    return out


def _fill(template: str, fields: dict, image_text: str = "") -> str:
    values = dict(fields)
    if "image" in values:
        values["image"] = image_text
    try:
        return template.format_map(values)
    except (KeyError, IndexError, ValueError) as e:
        raise TaskError(f"template {template!r} cannot be filled from fields {sorted(values)}: {e}") from None


def _answer(spec: TaskSpec, example: Example) -> str:
    return _fill(spec.answer, {**example.fields, "answer": example.answer})
