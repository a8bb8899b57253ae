"""ACT, attention calibration (Yu et al., ICML 2024): shrink attention sinks, give the mass back.

Per input and head, at prefill: key j (not the row's first token) is a sink
when its column score ``sum_i A_ij / (rows that see j)`` exceeds tau. In every
row, sinks keep ``beta`` of their attention and the freed mass goes to the
non-sink keys of the row in proportion to their weight (rows still sum to 1).
Sinks found at prefill are kept for the generated tokens (the authors' code
recomputes them from the one query row of a decoding step, which breaks).

Defaults follow the authors' code: beta 0.4, tau 0.1 (0.15 in their chat
setting, recipe ``act-chat``), layers 2 .. L-1 (their Mistral, multiple-choice
and MT-Bench runs; their Llama-2 classification runs stop at L-2). Which heads:
`find` applies ACT to one candidate head at a time on a calibration set, then
combines the heads that helped alone greedily (best first), keeping a head only
when the combination with it scores higher than without it: heads that help
alone can hurt together, and the recipe written is judged as a whole.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

from pydantic import Field

from attnedit.errors import AttneditError
from attnedit.lazy import torch
from attnedit.recipe import InterventionSpec, LayerSel
from attnedit.tables import ACTSINK, Detect, KeySet, MoveEffect

from .calibration import SCORED_TASKS, Calibration, Found, need_scorer, recipe_of, score_all
from .registry import Method, Param, Search, register


class ActSpec(InterventionSpec):
    type: Literal["act"]
    beta: float = Field(default=0.4, ge=0, le=1, description="fraction of a sink's attention that is kept")
    tau: float = Field(default=0.1, gt=0, le=1, description="column-score threshold above which a key is a sink")

    layers: LayerSel = "2:"  # layers 2 .. L-1


@dataclass(frozen=True, eq=False)
class ActSinks:
    """Sink detection from column scores; `tau` (H,) per query head, NaN where the head does not detect."""

    tau: torch.Tensor
    flag: int = ACTSINK
    where: str = "attention"

    def detect(self, colsum: torch.Tensor, count: torch.Tensor, first_key: torch.Tensor) -> torch.Tensor:
        """(B, H, K) colsum, (B, 1|H, K) count, (B,) first key -> (B, H, K) bool sinks."""
        B, H, K = colsum.shape
        score = colsum / count.clamp_min(1.0)
        tau = self._tau_on(colsum.device).view(1, H, 1)
        sink = (score > tau) & (count > 0)  # NaN tau compares False
        keys = torch.arange(K, device=colsum.device).view(1, 1, K)
        return sink & (keys != first_key.view(B, 1, 1))

    def _tau_on(self, device) -> torch.Tensor:
        """`tau` on `device`, copied there once (a copy at every prefill would block CUDA-graph capture)."""
        if self.tau.device == device:
            return self.tau
        on = self.__dict__.setdefault("_on", {})  # frozen dataclass: a per-instance cache beside the fields
        if device not in on:
            on[device] = self.tau.to(device)
        return on[device]

    def merge(self, other: "ActSinks") -> "ActSinks":
        tau = torch.where(torch.isnan(other.tau), self.tau, other.tau)
        return ActSinks(tau)


def compile(spec: ActSpec, info, model=None) -> list:
    out = []
    for layer, heads in spec.targets(info).items():
        tau = torch.full((info.n_heads,), float("nan"))
        tau[heads] = spec.tau
        out.append(Detect(layer, ActSinks(tau)))
        out.append(MoveEffect(layer, tuple(heads), KeySet(on=ACTSINK), KeySet(off=ACTSINK), spec.beta))
    return out


def find(spec: ActSpec, cal: Calibration) -> Found:
    """ACT's head search: each candidate (layer, head) alone, then a greedy combination judged as a whole.

    Stage 1 scores every head alone and keeps those above the unpatched score. Stage 2 adds them
    one at a time, best first, to the set kept so far, and keeps a head only when the set with it
    scores higher than the set without it. So the recipe written scores at least as well as the
    unpatched model on the calibration examples (exactly the score reported), never lower.

    With option ``screen=N`` (and ``cal.scorer_for``), stage 1 scores the heads alone on a seeded N of
    the examples (a head passes when it beats the unpatched score on those N); with ``combine=M``,
    stage 2 tries only the M best of them.

    Args:
        spec: the ACT spec whose targets are the candidates (beta, tau kept).
        cal: the calibration context (`cal.score` on the calibration split); `max_candidates`
            bounds both stages together.
    Returns:
        A `Found` with one ACT spec over the kept heads (none when no head helps), and its score.
    """
    score = need_scorer(cal, "act")
    baseline = float(score(None))
    candidates = []
    for layer, heads in spec.targets(cal.info).items():
        for h in heads:
            candidates.append(({"layer": layer, "head": h}, recipe_of(_spec({layer: [h]}, spec))))
    screen, screen_base = _screen(cal)
    if screen is None:
        records = score_all(cal, candidates, "ACT heads")
    else:
        records = score_all(replace(cal, score=screen), candidates, "ACT heads (screening)")
    alone = baseline if screen is None else screen_base
    helped = sorted((r for r in records if r["score"] > alone), key=lambda r: -r["score"])  # stable: ties in order
    combine = cal.options.get("combine")
    if combine is not None and (not isinstance(combine, int) or combine < 1):
        raise AttneditError(f"act option combine={combine!r}: a number of heads, at least 1")
    left = None if cal.max_candidates is None else max(0, cal.max_candidates - len(records))
    limits = [n for n in (left, combine) if n is not None]
    todo = helped[: min(limits)] if limits else helped
    kept: dict[int, list[int]] = {}
    current = baseline
    combined = []
    step = cal.progress(len(todo), "ACT heads combined") if cal.progress and todo else (lambda **_: None)
    for r in todo:
        layer, h = r["candidate"]["layer"], r["candidate"]["head"]
        trial = {k: list(v) for k, v in kept.items()}
        trial.setdefault(layer, []).append(h)
        value = float(score(recipe_of(_spec(trial, spec))))
        keep = value > current
        combined.append({"candidate": {"stage": "combine", "layer": layer, "head": h}, "score": value, "kept": keep})
        if keep:
            kept, current = trial, value
        step(advance=1)
    kept = {layer: sorted(hs) for layer, hs in sorted(kept.items())}
    specs = [_spec(kept, spec)] if kept else []
    chosen = {
        "heads": kept,
        "n_heads": sum(map(len, kept.values())),
        "score": current,
        "rule": "helped alone, and raised the score of the heads kept before it",
    }
    notes = {
        "screened_on": None if screen is None else {"examples": screen.n, "unpatched": screen_base},
        "candidates_total": len(candidates),
        "helped_alone": len(helped),
        "combined_tried": len(todo),
        "combined_skipped": len(helped) - len(todo),
    }
    return Found(specs, records + combined, chosen if kept else None, baseline, notes, score=current)


def _screen(cal: Calibration):
    """(scorer, unpatched score) on a seeded part of the examples for stage 1, or (None, None).

    Option ``screen`` (``--param screen=N``): score the heads alone on N of the calibration examples;
    the combination (stage 2) is judged on all of them. Default: all examples in both stages.
    """
    n = cal.options.get("screen")
    if n is None:
        return None, None
    if not isinstance(n, int) or n < 1:
        raise AttneditError(f"act option screen={n!r}: a number of examples, at least 1")
    if cal.scorer_for is None or not cal.examples or n >= len(cal.examples):
        return None, None
    part = random.Random(f"screen:{cal.seed}").sample(list(cal.examples), n)
    scorer = cal.scorer_for(part)
    scorer.n = n
    return scorer, float(scorer(None))


def _spec(heads: dict[int, list[int]], like: ActSpec) -> ActSpec:
    return ActSpec(type="act", heads=heads, beta=like.beta, tau=like.tau)


METHOD = register(
    Method(
        name="act",
        schema=ActSpec,
        compile=compile,
        summary="ACT: reduce detected attention sinks by beta, redistribute to the other keys",
        emits=(Detect, MoveEffect),
        per_input=True,  # sinks are detected in each input's attention map at prefill
        search=Search(
            find=find,
            about="heads whose ACT beats the unpatched score alone, combined greedily while the set improves",
            scores_on=SCORED_TASKS,
            params=(
                Param("screen", int, "score heads alone on this many of the examples (default: all)", None, ge=1),
                Param("combine", int, "try at most this many single heads in the combination", None, ge=1),
            ),
        ),
    )
)
