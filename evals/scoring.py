"""Scoring encoded examples with a model: choice log-likelihoods or greedy generations, batched.

Batches are left padded, with position ids counted from each row's first real
token, so a row scores the same in any batch as alone. Choices that are single
tokens are read from one forward of the prompt (the last position's logits);
longer choices are scored as continuations (prompt + choice, summed
log-probabilities of the choice's tokens). Batches are formed from the examples
sorted by length (longest first, ties by position), so they are the same in
every run with the same batch size.

Longer choices are scored from one forward of the prompt with its KV cache, then
one short forward per choice index over the cached prompt (the cache cut back to
the prompt after each), so a multi-token task costs about what a one-token task
does. A choice is scored as the model would generate it: under a patch, what it
detects at the prompt (ACT's sinks, VHR's sink tokens) holds for the answer's
tokens, as for generated tokens. Under a patch that reads the input ids or hooks
the whole forward (spans, image tokens, per-input head scales), each choice is
scored as a full forward of prompt + choice instead.
"""

from __future__ import annotations

import importlib
import inspect
import re
import string
from contextlib import nullcontext
from typing import Any, Sequence

from attnedit.lazy import torch

from .prompts import Encoded
from .spec import TaskSpec


def plan_batches(items: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Positions of `items` grouped into batches: longest first, fixed for a given batch size."""
    order = sorted(range(len(items)), key=lambda i: (-items[i].length, i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and attention mask, rows aligned to the right."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, T - len(r) :] = 1
    return ids.to(device), mask.to(device)


def forward_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: int, **extra) -> torch.Tensor:
    """Logits of the last `keep` positions, (B, keep, V), fp32."""
    kwargs = dict(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False, **extra)
    if plain_positions(model):  # positions count from each row's first real token
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(**kwargs).logits.float()


def plain_positions(model) -> bool:
    """Whether the model takes 1-D position ids (not Qwen2-VL's multimodal rope, which builds its own)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    return not (isinstance(rope, dict) and "mrope_section" in rope)


def choice_scores(
    model, items: Sequence[Encoded], pad_id: int, chunk: int = 8, cached: bool | None = None
) -> tuple[list[list[float]], list[list[int]]]:
    """Per item and choice: the summed log-likelihood of the choice's tokens, and their number.

    The path is chosen per item, never per batch, so an item scores the same whatever it is batched
    with (a patch that detects sinks over the whole sequence would otherwise see different inputs).

    Args:
        cached: score multi-token choices over the prompt's KV cache (True) or as full prompt + choice
            forwards (False); None: the cache unless the active patch reads the input ids (see above).
    """
    raw = [[0.0] * len(it.choice_ids) for it in items]
    lengths = [[len(c) for c in it.choice_ids] for it in items]
    single = [b for b, it in enumerate(items) if all(len(c) == 1 for c in it.choice_ids)]
    if single:
        _last_position(model, items, single, pad_id, raw)
    multi = [b for b in range(len(items)) if b not in single and items[b].choice_ids]
    if cached is None:
        cached = plain_positions(model) and not _reads_input(model)
    if cached:
        for start in range(0, len(multi), chunk):
            _cached_continuations(model, items, multi[start : start + chunk], pad_id, raw)
        return raw, lengths
    seqs = [(b, j) for b in multi for j in range(len(items[b].choice_ids))]
    for start in range(0, len(seqs), chunk):
        _continuations(model, items, seqs[start : start + chunk], pad_id, raw)
    return raw, lengths


def _reads_input(model) -> bool:
    """Whether an active attnedit patch rules out the cached path for multi-token choices.

    It does when the patch reads the input ids or hooks the whole forward (spans, image tokens,
    per-input head scales): those see the whole input at once.
    """
    P = importlib.import_module("attnedit.patch")  # the module (`attnedit.patch` is also the function)
    active = P.active_patch(model) if hasattr(P, "active_patch") else getattr(P, "_ACTIVE", {}).get(model)
    if active is None:
        return False
    return bool(active.compiled.input_detectors or active.compiled.forward_hooks)


def _cache_arg(model) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cached_continuations(model, items, rows: list[int], pad_id: int, raw: list[list[float]]) -> None:
    """Multi-token choices: one forward of the prompts with a cache, then one forward per choice index.

    The j-th choices of all rows go in one forward over the cached prompts (right padded to the
    longest; a row with fewer choices gets padding only); the cache is cut back to the prompts after
    each. Token t of a choice is predicted by the logits at its previous position: the prompt's last
    position for t = 0.
    """
    device = _device(model)
    ids, mask = left_pad([items[b].prompt_ids for b in rows], pad_id, device)
    lens = mask.sum(1)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = getattr(out, "cache", None) or out.past_key_values
        first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): predicts each choice's first token
        for j in range(max(len(items[b].choice_ids) for b in rows)):
            conts = [items[b].choice_ids[j] if j < len(items[b].choice_ids) else [] for b in rows]
            L = max(len(c) for c in conts)
            if L == 0:
                continue
            cids = torch.full((len(rows), L), pad_id, dtype=torch.long)
            cmask = torch.zeros((len(rows), L), dtype=torch.long)
            for r, c in enumerate(conts):
                cids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
                cmask[r, : len(c)] = 1
            cids, cmask = cids.to(device), cmask.to(device)
            logp = None
            if L > 1:
                step = model(
                    input_ids=cids,
                    attention_mask=torch.cat([mask, cmask], 1),
                    position_ids=lens[:, None] + torch.arange(L, device=device)[None, :],
                    use_cache=True,
                    **{_cache_arg(model): cache},
                )
                logp = step.logits.float().log_softmax(-1)  # (B, L, V): position t predicts token t + 1
                cache.crop(-L)  # back to the prompts (a negative length removes that many tokens)
            for r, (b, c) in enumerate(zip(rows, conts)):
                if not c:
                    continue
                total = first[r, c[0]]
                if len(c) > 1:
                    nxt = torch.tensor(c[1:], device=device)
                    total = total + logp[r, torch.arange(len(c) - 1, device=device), nxt].sum()
                raw[b][j] = total.item()


def _last_position(model, items, rows: list[int], pad_id: int, raw: list[list[float]]) -> None:
    """Single-token choices: one forward of each prompt, read at its last position."""
    ids, mask = left_pad([items[b].prompt_ids for b in rows], pad_id, _device(model))
    logp = forward_logits(model, ids, mask, 1)[:, -1].log_softmax(-1)  # (B, V)
    for r, b in enumerate(rows):
        raw[b] = [logp[r, c[0]].item() for c in items[b].choice_ids]


def _continuations(model, items, part: list[tuple[int, int]], pad_id: int, raw: list[list[float]]) -> None:
    """Longer choices: forwards of prompt + choice; the choice's tokens' log-probabilities summed."""
    device = _device(model)
    conts = [items[b].choice_ids[j] for b, j in part]
    keep = max(len(c) for c in conts) + 1
    ids, mask = left_pad([items[b].prompt_ids + c for (b, _), c in zip(part, conts)], pad_id, device)
    logp = forward_logits(model, ids, mask, keep).log_softmax(-1)  # (rows, keep, V)
    for r, ((b, j), cont) in enumerate(zip(part, conts)):
        # the logits at kept position p predict token p + 1; the choice fills the last len(cont) tokens
        pos = torch.arange(keep - 1 - len(cont), keep - 1, device=device)
        raw[b][j] = logp[r, pos, torch.tensor(cont, device=device)].sum().item()


def normalise_scores(raw: list[float], lengths: list[int], choices: Sequence[str], how: str) -> list[float]:
    """Length normalisation of choice log-likelihoods: none, per token, or per character (lm-eval's acc_norm)."""
    if how == "tokens":
        return [s / max(n, 1) for s, n in zip(raw, lengths)]
    if how == "chars":
        return [s / max(len(c), 1) for s, c in zip(raw, choices)]
    return list(raw)


def generate(model, tokenizer, items: Sequence[Encoded], spec: TaskSpec) -> list[str]:
    """Greedy continuations of each prompt, cut at the first stop string."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids, mask = left_pad([it.prompt_ids for it in items], tok.pad_token_id, _device(model))
    kwargs: dict[str, Any] = dict(max_new_tokens=spec.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if spec.stop:
        kwargs["stopping_criteria"] = [_StopStrings(tok, list(spec.stop), ids.shape[1])]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [cut(t, spec.stop) for t in texts]


class _StopStrings:
    """Stop a row once its generated text holds a stop string (decoded, so any tokenizer works)."""

    def __init__(self, tok, stops: list[str], start: int):
        self.tok, self.stops, self.start = tok, stops, start

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


def cut(text: str, stops: Sequence[str]) -> str:
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def generation_correct(output: str, targets: Sequence[str], how: str) -> bool:
    out = normalise_answer(output)
    if how == "contains":
        return any(normalise_answer(t) and normalise_answer(t) in out for t in targets)
    return any(out == normalise_answer(t) for t in targets)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def patched(model, recipe, backend: str | None = None):
    """A context with `recipe` (a Recipe, a recipe path, or a ready `Patch`) applied; None: unpatched."""
    if recipe is None:
        return nullcontext()
    from attnedit.patch import Patch, patch  # noqa: PLC0415  (attnedit.patch loads torch and transformers; recipes are read without them)

    return recipe if isinstance(recipe, Patch) else patch(model, recipe, backend=backend)
