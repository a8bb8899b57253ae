"""Head pruning (PH3, Jin et al., 2024, and friends): silence chosen heads.

A pruned head's output before ``o_proj`` is multiplied by 0 (``ablation: zero``)
or replaced by its mean over a reference set (``ablation: mean``; the means are
stored in the recipe, one vector of head_dim values per pruned head, computed
by `head_means`). Static: zero ablation folds into ``o_proj`` on export.

`find` is PH3's head search on knowledge-conflict prompts (a context states a
counterfactual object against the model's memory). Each head is scored by its
effect on the logit difference ``LD = logit(memory answer) - logit(context
answer)`` at the answer position when the head is ablated: by patching its
output on the direct path to the logits (``patching: direct``, one forward for
every head, the path-patching receiver being the final residual stream), or
on every path by rerunning the model with the head ablated (``patching: total``,
one forward per head). Heads whose presence raises LD are memory heads, those
that lower it context heads; the top-k of the kind the user names are pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from attnedit import evals
from attnedit.errors import AttneditError, RecipeError
from attnedit.lazy import no_grad, torch
from attnedit.modelinfo import text_decoder
from attnedit.recipe import InterventionSpec
from attnedit.tables import Scale

from .calibration import SCORED_TASKS, Calibration, Found, recipe_of
from .heads import HeadOutputs, head_means, left_padded, o_proj
from .registry import Method, Param, Search, register


class HeadPruneSpec(InterventionSpec):
    type: Literal["head_prune"]
    ablation: Literal["zero", "mean"] = "zero"
    means: dict[int, dict[int, list[float]]] | None = Field(
        default=None, description="for ablation: mean, {layer: {head: [head_dim floats]}} over a reference set"
    )

    @model_validator(mode="after")
    def _means_given(self):
        if self.ablation == "zero" and self.means:
            raise ValueError("'means' is only used with ablation: mean")
        return self

    def notes(self):
        if self.ablation == "mean" and self.means is None:
            return [
                (
                    ("ablation",),
                    "ablation: mean without 'means': apply, eval and export refuse it until `attnedit calibrate` "
                    "computes the means (or add means: {layer: {head: [...]}})",
                )
            ]
        return []

    def check_method_model(self, info):
        problems = []
        if self.ablation != "mean" or self.means is None:  # no means at all: calibrate computes them, compile refuses
            return problems
        for layer, heads in self.targets(info).items():
            have = (self.means or {}).get(layer, {})
            for h in heads:
                if h not in have:
                    problems.append(
                        (
                            ("means",),
                            f"no mean for layer {layer} head {h}; `attnedit calibrate RECIPE --task T` computes "
                            "them over the task's train prompts",
                        )
                    )
                elif len(have[h]) != info.head_dim:
                    problems.append(
                        (("means", layer, h), f"has {len(have[h])} values; the model's head_dim is {info.head_dim}")
                    )
        return problems


def compile(spec: HeadPruneSpec, info, model=None) -> list:
    if spec.ablation == "mean" and spec.means is None:
        raise RecipeError(
            [
                "head_prune: ablation 'mean' needs 'means' ({layer: {head: [head_dim floats]}}); "
                "`attnedit calibrate RECIPE --task T` computes them over the task's train prompts"
            ]
        )
    out = []
    for layer, heads in spec.targets(info).items():
        shift = None
        if spec.ablation == "mean":
            shift = torch.tensor([spec.means[layer][h] for h in heads], dtype=torch.float32)
        out.append(Scale(layer, tuple(heads), 0.0, shift))
    return out


# --------------------------------------------------------------------------- PH3


@dataclass(frozen=True)
class ConflictPrompt:
    """One knowledge-conflict prompt for PH3.

    Attributes:
        prompt: the context (stating a counterfactual object) and the question, ending before the answer.
        question: the question alone (to check that the model recalls the fact).
        memory_id, context_id: first token of the memory answer and of the context's answer.
    """

    prompt: str
    question: str
    memory_id: int
    context_id: int


def conflict_prompts(task, examples, tokenizer) -> list[ConflictPrompt]:
    """PH3's inputs from a knowledge_conflict task: prompt, question, first tokens of both answers."""
    out = []
    for ex, enc in zip(examples, evals.encode(task, examples, tokenizer, shots=0)):
        ctx, mem = enc.choice_ids[0], enc.choice_ids[1]  # choices are (context answer, memory answer)
        if ctx and mem:
            out.append(ConflictPrompt(enc.prompt, str(ex.fields["question"]), mem[0], ctx[0]))
    return out


@no_grad
def _logit_diff(model, tokenizer, texts, ids, batch_size, device) -> torch.Tensor:
    """(N,) logit(memory) - logit(context) at each prompt's last position."""
    out = []
    for i, enc in enumerate(left_padded(tokenizer, texts, batch_size, device)):
        logits = model(**enc, use_cache=False).logits[:, -1].float()
        pair = ids[i * batch_size : i * batch_size + logits.shape[0]].to(logits.device)
        out.append((logits.gather(1, pair[:, :1]) - logits.gather(1, pair[:, 1:])).squeeze(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@no_grad
def _direct_effects(model, tokenizer, texts, ids, ref: dict, batch_size, info) -> torch.Tensor:
    """(L, H) mean over prompts of LD(clean) - LD(head ablated on its direct path to the logits)."""
    device = next(model.parameters()).device
    L, H, D = info.n_layers, info.n_heads, info.head_dim
    norm, unembed = text_decoder(model).norm, model.get_output_embeddings().weight
    resid: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda m, a: resid.append(a[0][:, -1].detach().float()))
    total = torch.zeros(L, H)
    try:
        with HeadOutputs(model, range(L), D) as rec:
            for i, enc in enumerate(left_padded(tokenizer, texts, batch_size, device)):
                model(**enc, use_cache=False)
                r = resid.pop()  # (B, hidden) final residual at the answer position
                pair = ids[i * batch_size : i * batch_size + r.shape[0]].to(device)
                w = (unembed[pair[:, 0]] - unembed[pair[:, 1]]).float()  # (B, hidden)
                delta = torch.stack(
                    [_delta(model, l, rec.out[l].pop()[:, -1], ref[l]) for l in range(L)], 1
                )  # (B, L, H, hidden)
                ld_clean = (_normed(norm, r) * w).sum(-1)  # (B,)
                ld_ablated = (_normed(norm, r[:, None, None] - delta) * w[:, None, None]).sum(-1)  # (B, L, H)
                total += (ld_clean[:, None, None] - ld_ablated).sum(0).cpu()
    finally:
        handle.remove()
    return total / max(1, len(texts))


def _normed(norm, x: torch.Tensor) -> torch.Tensor:
    return norm(x.to(norm.weight.dtype)).float()


def _delta(model, layer: int, o: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B, H, D) head outputs minus their ablated value -> (B, H, hidden) change of the residual stream."""
    W = o_proj(model, layer).weight.float()  # (hidden, H*D)
    H, D = o.shape[1], o.shape[2]
    diff = o - ref.to(o.device).view(1, H, D)
    return torch.einsum("bhd,ohd->bho", diff, W.view(-1, H, D))


def _total_effects(model, tokenizer, texts, ids, spec_for, targets, batch_size, cal) -> dict:
    """{(layer, head): mean LD(clean) - LD(head ablated everywhere)}, one forward pass set per head."""
    from attnedit.patch import Patch  # noqa: PLC0415  (attnedit.patch loads torch and transformers; recipes are read without them)

    device = next(model.parameters()).device
    clean = _logit_diff(model, tokenizer, texts, ids, batch_size, device)
    heads = [(l, h) for l, hs in targets.items() for h in hs][: cal.max_candidates]
    step = cal.progress(len(heads), "PH3 head patching") if cal.progress else (lambda **_: None)
    out = {}
    for l, h in heads:
        with Patch(model, recipe_of(spec_for({l: [h]})), backend="reference"):
            out[(l, h)] = float((clean - _logit_diff(model, tokenizer, texts, ids, batch_size, device)).mean())
        step(advance=1)
    return out


def _means_only(spec: HeadPruneSpec, cal: Calibration) -> Found:
    """Mean ablation of the given heads: their means over the calibration prompts (the reference set)."""
    targets = spec.targets(cal.info)
    means = head_means(cal.model, cal.tokenizer, list(cal.prompts), targets, cal.info.head_dim)
    out = HeadPruneSpec(type="head_prune", heads=targets, ablation="mean", means=means)
    return Found([out], [], {"heads": targets, "means_over": f"{len(cal.prompts)} calibration prompts"}, None, {})


def _recalled(cal: Calibration, conflicts: list[ConflictPrompt], bs: int) -> tuple[list[ConflictPrompt], torch.Tensor]:
    """Keep the conflicts whose fact the model recalls without the context; (kept, (N, 2) [memory, context] ids)."""
    ids = torch.tensor([[c.memory_id, c.context_id] for c in conflicts], dtype=torch.long)
    device = next(cal.model.parameters()).device
    known = _logit_diff(cal.model, cal.tokenizer, [c.question for c in conflicts], ids, bs, device) > 0
    kept = [c for c, ok in zip(conflicts, known.tolist()) if ok]
    if len(kept) < 8:
        raise AttneditError(
            f"only {len(kept)} conflict prompts ask facts the model recalls; PH3 needs at least 8 (raise --limit)"
        )
    return kept, ids[known]


def _top_k(scores: dict[tuple[int, int], float], prune: str, k: int) -> list[tuple[tuple[int, int], float]]:
    """The k strongest memory heads (positive scores) or context heads (negative scores)."""
    sign = 1.0 if prune == "memory" else -1.0
    return sorted((kv for kv in scores.items() if sign * kv[1] > 0), key=lambda kv: -sign * kv[1])[:k]


def find(spec: HeadPruneSpec, cal: Calibration) -> Found:
    """PH3: score every head on knowledge-conflict prompts and prune the top-k of one kind.

    On another task with ``ablation: mean``, it only computes the given heads' means over the
    calibration prompts (mean ablation of a fixed head list).

    Options (``cal.options``): ``prune`` (memory | context: which heads to prune, default memory,
    which makes the model follow the context), ``k`` (default 5), ``patching`` (direct | total),
    ``batch_size`` (default 8). The calibration examples are `ConflictPrompt`s (from a knowledge_conflict task).

    Returns:
        A `Found` with the pruning spec (with means for mean ablation) and every head's score; its
        baseline and score are the rate at which the kept kind's answer wins (the context's answer
        for ``prune: memory``) on the recalled conflicts, unpatched and pruned.
    """
    prune, k = str(cal.options.get("prune", "memory")), int(cal.options.get("k", 5))
    patching, bs = str(cal.options.get("patching", "direct")), int(cal.options.get("batch_size", 8))
    if prune not in ("memory", "context") or patching not in ("direct", "total"):
        raise AttneditError("head_prune options: prune is memory or context, patching is direct or total")
    conflicts = [c for c in cal.examples if isinstance(c, ConflictPrompt) and c.memory_id != c.context_id]
    if not conflicts and spec.ablation == "mean" and cal.prompts:
        return _means_only(spec, cal)
    if not conflicts:
        raise AttneditError(
            "PH3 head search needs knowledge-conflict prompts: use a knowledge_conflict task (--task lama-conflict)"
        )
    from attnedit.patch import Patch  # noqa: PLC0415  (attnedit.patch loads torch and transformers; recipes are read without them)

    model, tok, info = cal.model, cal.tokenizer, cal.info
    conflicts, ids = _recalled(cal, conflicts, bs)
    texts, targets = [c.prompt for c in conflicts], spec.targets(info)
    every = {l: list(range(info.n_heads)) for l in range(info.n_layers)}
    means = head_means(model, tok, texts, every, info.head_dim, bs) if spec.ablation == "mean" else None

    def spec_for(heads):
        m = {l: {h: means[l][h] for h in hs} for l, hs in heads.items()} if means else None
        return HeadPruneSpec(type="head_prune", heads=heads, ablation=spec.ablation, means=m)

    if patching == "direct":
        ref = {
            l: torch.tensor([means[l][h] for h in every[l]]) if means else torch.zeros(info.n_heads, info.head_dim)
            for l in every
        }
        effect = _direct_effects(model, tok, texts, ids, ref, bs, info)
        scores = {(l, h): float(effect[l, h]) for l, hs in targets.items() for h in hs}
    else:
        scores = _total_effects(model, tok, texts, ids, spec_for, targets, bs, cal)
    ranked = _top_k(scores, prune, k)
    heads: dict[int, list[int]] = {}
    for (l, h), _ in sorted(ranked):
        heads.setdefault(l, []).append(h)
    device = next(model.parameters()).device
    records = [{"candidate": {"layer": l, "head": h}, "score": s} for (l, h), s in scores.items()]
    notes = {
        "prune": prune,
        "k": k,
        "patching": patching,
        "n_conflicts": len(texts),
        "memory_rate_before": float((_logit_diff(model, tok, texts, ids, bs, device) > 0).float().mean()),
    }
    # the search's own objective: how often the answer of the kind kept wins (LD < 0: the context's)
    rate = (lambda memory: 1.0 - memory) if prune == "memory" else (lambda memory: memory)
    notes["objective"] = "context_rate" if prune == "memory" else "memory_rate"
    baseline = rate(notes["memory_rate_before"])
    if not heads:
        return Found([], records, None, baseline, notes, score=baseline)
    with Patch(model, recipe_of(spec_for(heads)), backend="reference"):
        notes["memory_rate_after"] = float((_logit_diff(model, tok, texts, ids, bs, device) > 0).float().mean())
    chosen = {"heads": heads, "scores": {f"{l}.{h}": s for (l, h), s in ranked}}
    return Found([spec_for(heads)], records, chosen, baseline, notes, score=rate(notes["memory_rate_after"]))


def _kinds_for(spec: HeadPruneSpec) -> tuple[tuple[str, ...], str] | None:
    """Zero ablation has only PH3's search, on knowledge conflicts; mean ablation also takes a scored task
    (the given heads' means over its prompts)."""
    if spec.ablation == "zero":
        return ("knowledge_conflict",), "ablation: zero (PH3's search on knowledge conflicts)"
    return None


METHOD = register(
    Method(
        name="head_prune",
        schema=HeadPruneSpec,
        compile=compile,
        summary="Head pruning: zero or mean-ablate chosen heads (PH3 memory/context heads)",
        emits=(Scale,),
        fold="zero ablation: o_proj columns; mean ablation: o_proj columns and bias",
        search=Search(
            find=find,
            about="PH3: each head's effect on memory-vs-context logits on knowledge conflicts, top-k pruned; "
            "on another task with ablation: mean, the given heads' means",
            scores_on=SCORED_TASKS,
            reads={"knowledge_conflict": conflict_prompts},
            kinds_for=_kinds_for,
            needs_context=True,
            params=(
                Param("prune", str, "which heads to prune", "memory", choices=("memory", "context")),
                Param("k", int, "how many heads to prune", 5, ge=1),
                Param("patching", str, "how a head's effect is measured", "direct", choices=("direct", "total")),
                Param("batch_size", int, "prompts per forward", 8, ge=1),
            ),
        ),
    )
)
