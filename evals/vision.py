"""POPE-style yes/no questions about an image, for vision-language models.

Each example has an image path and a question; the answer words ("yes", "no")
are scored from the last position of one forward over image + prompt. The
processor turns the prompt's image token into the model's image tokens and the
image into pixel values, batch by batch (left padded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from attnedit.lazy import torch

from .prompts import Encoded
from .scoring import forward_logits
from .spec import TaskError


def image_text(processor) -> str:
    """The processor's image placeholder string (what an ``{image}`` slot becomes in plain prompts)."""
    token = getattr(processor, "image_token", None)
    if not token:
        raise TaskError(
            "a pope task needs a vision-language model: its processor has no image token "
            f"({type(processor).__name__}); load the model with attnedit.load, which returns the processor"
        )
    return token


def load_image(path: str):
    from PIL import Image  # noqa: PLC0415  (optional: only image tasks need it)

    if not Path(path).is_file():
        raise TaskError(f"image file not found: {path}")
    with Image.open(path) as img:
        return img.convert("RGB")


def pope_scores(model, processor, items: Sequence[Encoded]) -> tuple[list[list[float]], list[list[int]]]:
    """Per item, the log-probability of each (single-token) answer word after image + prompt."""
    if any(len(c) != 1 for it in items for c in it.choice_ids):
        raise TaskError("pope answer words must be single tokens for this tokenizer; change 'labels' in the task spec")
    tok = getattr(processor, "tokenizer", processor)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = processor(
            text=[it.prompt for it in items],
            images=[load_image(it.image) for it in items],
            return_tensors="pt",
            padding=True,
        )
    finally:
        tok.padding_side = side
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    logp = forward_logits(model, ids, mask, 1, **inputs)[:, -1].log_softmax(-1)  # (B, V)
    scores = [[logp[b, c[0]].item() for c in it.choice_ids] for b, it in enumerate(items)]
    return scores, [[1] * len(it.choice_ids) for it in items]
