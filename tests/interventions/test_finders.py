"""Target finders with synthetic scorers (their search logic), and PH3 / mean ablation on a tiny model."""

from __future__ import annotations

from dataclasses import replace

import models
import pytest
import torch

import attnedit
from attnedit.interventions import act, head_prune, registry, zerotuning
from attnedit.interventions import calibration as C
from attnedit.interventions.calibration import Calibration, recipe_of
from attnedit.modelinfo import ModelInfo, decoder_layers
from attnedit.recipe import Recipe

INFO = ModelInfo("toy", "llama", n_layers=6, n_heads=4, n_kv_heads=2, head_dim=8, hidden_size=32)


def heads_of(recipe) -> set[tuple[int, int]]:
    (spec,) = recipe.interventions
    return {(l, h) for l, hs in spec.targets(INFO).items() for h in hs}


def test_act_scores_heads_alone_then_keeps_those_that_help_together():
    good = {(2, 1): 0.1, (4, 0): 0.05, (5, 3): 0.02}  # additive gains: every helpful head survives combination
    seen = []

    def score(recipe):
        if recipe is None:
            return 0.5
        heads = heads_of(recipe)
        seen.append(heads)
        if len(heads) == 1 and heads <= {(3, 3)}:
            return 0.5  # a tie is not an improvement
        return 0.5 + sum(good.get(lh, -0.1) for lh in heads)

    found = act.find(act.ActSpec(type="act"), Calibration(None, None, INFO, score=score))
    singles = [next(iter(h)) for h in seen if len(h) == 1][:16]
    assert singles == [(l, h) for l in range(2, 6) for h in range(4)]  # layers 2..L-1, every head alone first
    assert seen[16:] == [{(2, 1)}, {(2, 1), (4, 0)}, {(2, 1), (4, 0), (5, 3)}]  # then combined, best first
    (spec,) = found.specs
    assert {(l, h) for l, hs in spec.heads.items() for h in hs} == set(good)
    assert (spec.beta, spec.tau) == (0.4, 0.1) and found.baseline == 0.5
    assert found.score == pytest.approx(0.67) and found.chosen["score"] == found.score
    assert len(found.candidates) == 16 + 3 and all({"candidate", "score"} <= set(r) for r in found.candidates)


def test_act_heads_that_help_alone_but_hurt_together_are_not_all_kept():
    helpful = {(2, 0): 0.62, (3, 1): 0.61, (4, 2): 0.60, (5, 3): 0.59}

    def score(recipe):
        if recipe is None:
            return 0.5
        heads = heads_of(recipe)
        if len(heads) == 1:
            return helpful.get(next(iter(heads)), 0.45)
        return 0.3  # any two of them together: far worse than unpatched

    found = act.find(act.ActSpec(type="act"), Calibration(None, None, INFO, score=score))
    (spec,) = found.specs
    assert {(l, h) for l, hs in spec.heads.items() for h in hs} == {(2, 0)}  # the best alone, nothing added
    assert found.score == pytest.approx(0.62) and score(recipe_of(spec)) >= found.baseline
    combined = [r for r in found.candidates if r["candidate"].get("stage") == "combine"]
    assert [r["kept"] for r in combined] == [True, False, False, False]

    # every head alone helps a little, any union hurts: the written recipe is never below the baseline
    def union_hurts(recipe):
        if recipe is None:
            return 0.5
        return 0.51 if len(heads_of(recipe)) == 1 else 0.2

    found = act.find(act.ActSpec(type="act"), Calibration(None, None, INFO, score=union_hurts))
    (spec,) = found.specs
    assert union_hurts(recipe_of(spec)) == found.score == 0.51 >= found.baseline


def test_act_respects_max_candidates_and_reports_no_gain():
    found = act.find(act.ActSpec(type="act"), Calibration(None, None, INFO, score=lambda r: 0.5, max_candidates=5))
    assert len(found.candidates) == 5 and found.specs == [] and found.score == found.baseline == 0.5


def test_act_combination_stage_counts_against_max_candidates():
    def score(recipe):
        return 0.5 if recipe is None else 0.5 + 0.01 * len(heads_of(recipe))

    found = act.find(act.ActSpec(type="act"), Calibration(None, None, INFO, score=score, max_candidates=18))
    assert len(found.candidates) == 18 and found.notes["combined_tried"] == 2
    assert found.notes["combined_skipped"] == 14
    (spec,) = found.specs
    assert sum(map(len, spec.heads.values())) == 2 and found.score == pytest.approx(0.52)
    cal = Calibration(None, None, INFO, score=score, options={"combine": 3})
    found = act.find(act.ActSpec(type="act"), cal)
    assert found.notes["combined_tried"] == 3 and len(found.candidates) == 16 + 3


def test_calibrate_writes_nothing_when_the_found_recipe_scores_below_unpatched(monkeypatch):
    bad = zerotuning.ZeroTuningSpec(type="zerotuning", gamma=3.0)

    def finder(spec, cal):  # a search that reports no score of its own, and whose recipe hurts
        return C.Found([bad], [], {"gamma": 3.0}, None, {})

    zt = registry.get("zerotuning")
    monkeypatch.setitem(registry._METHODS, "zerotuning", replace(zt, search=replace(zt.search, find=finder)))
    cal = Calibration(None, None, INFO, score=lambda r: 0.6 if r is None else 0.4)
    resolved, (search,) = C.calibrate(Recipe.from_dict({"interventions": [{"type": "zerotuning", "gamma": 2}]}), cal)
    assert resolved.interventions == () and search["kept_interventions"] == 0
    assert search["score"] == 0.4 and search["baseline"] == 0.6 and "0.4000 < 0.6000" in search["why"]
    cal = Calibration(None, None, INFO, score=lambda r: 0.6 if r is None else 0.7)
    resolved, (search,) = C.calibrate(Recipe.from_dict({"interventions": [{"type": "zerotuning", "gamma": 2}]}), cal)
    assert resolved.interventions == (bad,) and "why" not in search and search["score"] == 0.7


def test_calibrate_writes_nothing_when_parts_help_alone_but_hurt_together():
    def score(recipe):
        if recipe is None:
            return 0.5
        specs = recipe.interventions
        if len(specs) > 1:
            return 0.4
        (spec,) = specs
        heads = {h for hs in spec.targets(INFO).values() for h in hs}
        return 0.6 if heads == {1} and spec.gamma == 3.0 else 0.45

    two = {"interventions": [{"type": "zerotuning", "gamma": 2, "heads": [1]}] * 2}
    cal = Calibration(None, None, INFO, score=score, options={"gammas": [3.0], "profile": "layer"})
    resolved, searches = C.calibrate(Recipe.from_dict(two), cal)
    assert [s["kept_interventions"] for s in searches[:2]] == [1, 1]
    assert resolved.interventions == () and "together score 0.4000 < 0.5000" in searches[-1]["why"]


def test_holdout_split_is_seeded_disjoint_and_checked():
    search, held = C.split_holdout(list(range(100)), 0.2, seed=3)
    assert len(held) == 20 and sorted(search + held) == list(range(100)) and not set(search) & set(held)
    assert C.split_holdout(list(range(100)), 0.2, seed=3) == (search, held)
    assert C.split_holdout(list(range(100)), 0.2, seed=4)[1] != held
    assert C.split_holdout(list(range(100)), 0.0, seed=3) == (list(range(100)), [])
    with pytest.raises(attnedit.AttneditError, match="leaves 12 for the search"):
        C.split_holdout(list(range(16)), 0.25, seed=0)


def test_zerotuning_profiles_heads_then_searches_gamma():
    up = {1, 3}  # head indices whose first-token boost helps

    def score(recipe):
        if recipe is None:
            return 0.50
        (spec,) = recipe.interventions
        heads = {h for hs in spec.targets(INFO).values() for h in hs}
        if spec.gamma == 2.0 and len(heads) == 1:  # profiling one head index across layers
            return 0.55 if heads <= up else 0.45
        if heads == up:  # the grid: up-effective heads are best near gamma 3
            return 0.7 - abs(spec.gamma - 3.0) / 10
        return 0.5 - abs(spec.gamma - 1.0) / 100

    spec = zerotuning.ZeroTuningSpec(type="zerotuning", gamma=2.0)
    found = zerotuning.find(spec, Calibration(None, None, INFO, score=score))
    (best,) = found.specs
    assert best.gamma == 3.0 and heads_of(recipe_of(best)) == {(l, h) for l in range(6) for h in up}
    assert found.notes["up_effective"] == {"layers": list(range(6)), "heads": [1, 3]}
    grid = [r["candidate"] for r in found.candidates if r["candidate"]["stage"] == "grid"]
    assert all(c["gamma"] > 1 for c in grid if c["heads"] == "up") and all(
        c["gamma"] < 1 for c in grid if c["heads"] == "down"
    )
    assert len([r for r in found.candidates if r["candidate"]["stage"] == "profile"]) == 4
    assert found.score == pytest.approx(0.7) and found.baseline == 0.5


def test_zerotuning_layer_profile_and_unknown_profile():
    seen = []
    spec = zerotuning.ZeroTuningSpec(type="zerotuning", gamma=2.0, layers=[0, 1])
    zerotuning.find(
        spec,
        Calibration(
            None, None, INFO, score=lambda r: seen.append(r) or 0.5, options={"profile": "layer", "gammas": [2.0]}
        ),
    )
    assert len(seen) == 1 + 2 + 1  # baseline, 2 layers profiled, the grid on all heads (no up/down set)
    with pytest.raises(attnedit.AttneditError, match="profile"):
        zerotuning.find(spec, Calibration(None, None, INFO, score=lambda r: 0.5, options={"profile": "heads"}))


# --------------------------------------------------------------------------- PH3 and mean ablation on a tiny model


@pytest.fixture(scope="module")
def tiny_lm():
    model = models.tiny("llama")
    with torch.no_grad():  # the last layer's MLP off: its heads then reach the logits only directly
        decoder_layers(model)[-1].mlp.down_proj.weight.zero_()
    return model, _ToyTokenizer()


class _ToyTokenizer:
    """Maps 'w12 w7 w99' to ids [12, 7, 99]; left padding with 0 (enough for these finders)."""

    padding_side = "left"
    pad_token_id = 0

    def __call__(self, texts, return_tensors="pt", padding=True, **_):
        rows = [[int(w[1:]) for w in t.split()] for t in texts]
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, T - len(r) :], mask[b, T - len(r) :] = torch.tensor(r), 1
        from transformers import BatchEncoding  # noqa: PLC0415

        return BatchEncoding({"input_ids": ids, "attention_mask": mask})


def _conflicts(model, n=16):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        q = torch.randint(3, 256, (6,), generator=g).tolist()
        ctx = torch.randint(3, 256, (5,), generator=g).tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([q])).logits[0, -1]
        mem, other = logits.topk(2).indices.tolist()  # the model "recalls" mem for the question
        text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
        out.append(head_prune.ConflictPrompt(text(ctx + q), text(q), mem, other))
    return out


def test_ph3_direct_scores_equal_ablation_effects_in_the_last_layer(tiny_lm):
    model, tok = tiny_lm
    info = ModelInfo.from_config(model.config)
    conflicts = _conflicts(model)
    found = head_prune.find(
        head_prune.HeadPruneSpec(type="head_prune"), Calibration(model, tok, info, examples=conflicts, options={"k": 3})
    )
    scores = {(r["candidate"]["layer"], r["candidate"]["head"]): r["score"] for r in found.candidates}
    assert len(scores) == info.n_layers * info.n_heads
    last = info.n_layers - 1
    ids = torch.tensor([[c.memory_id, c.context_id] for c in conflicts])
    texts = [c.prompt for c in conflicts]
    clean = head_prune._logit_diff(model, tok, texts, ids, 8, "cpu")
    for h in range(info.n_heads):  # the exact effect of pruning, through the patch and a full forward
        with attnedit.patch(model, recipe_of(head_prune.HeadPruneSpec(type="head_prune", heads={last: [h]}))):
            pruned = head_prune._logit_diff(model, tok, texts, ids, 8, "cpu")
        assert scores[(last, h)] == pytest.approx(float((clean - pruned).mean()), rel=1e-4, abs=1e-5)
    (spec,) = found.specs
    kept = sorted(((l, h) for l, hs in spec.heads.items() for h in hs), key=lambda lh: -scores[lh])
    top = sorted(scores, key=lambda lh: -scores[lh])[:3]
    assert sorted(kept) == sorted(top) and all(scores[lh] > 0 for lh in kept)  # the strongest memory heads
    assert "memory_rate_after" in found.notes and found.notes["objective"] == "context_rate"
    assert found.baseline == pytest.approx(1 - found.notes["memory_rate_before"])
    assert found.score == pytest.approx(1 - found.notes["memory_rate_after"])


def test_ph3_needs_conflict_prompts(tiny_lm):
    model, tok = tiny_lm
    cal = Calibration(model, tok, ModelInfo.from_config(model.config), examples=["not a conflict"])
    with pytest.raises(attnedit.AttneditError, match="knowledge_conflict"):
        head_prune.find(head_prune.HeadPruneSpec(type="head_prune"), cal)


def test_head_means_are_the_mean_output_over_real_tokens(tiny_lm):
    model, tok = tiny_lm
    texts = ["w5 w9 w33", "w7 w8 w9 w10 w11 w12 w13", "w100"]
    means = head_prune.head_means(model, tok, texts, {1: [0, 3]}, head_dim=16, batch_size=2)
    outs = []
    h = decoder_layers(model)[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: outs.append(a[0][0]))
    with torch.no_grad():
        for t in texts:  # one prompt at a time: no padding at all
            model(**tok([t]))
    h.remove()
    allrows = torch.cat(outs).view(-1, 8, 16)  # (tokens, H, D)
    for head in (0, 3):
        torch.testing.assert_close(torch.tensor(means[1][head]), allrows[:, head].mean(0), atol=1e-5, rtol=1e-4)


def test_act_screens_heads_on_part_of_the_examples_and_combines_on_all():
    parts = []

    def scorer_for(examples):
        parts.append(list(examples))

        def score(recipe):  # on the part: heads (2, 0) and (3, 0) look good; on all: only (3, 0) helps
            if recipe is None:
                return 0.5
            return 0.6 if heads_of(recipe) & {(2, 0), (3, 0)} else 0.4

        return score

    def full(recipe):
        if recipe is None:
            return 0.5
        return 0.7 if heads_of(recipe) == {(3, 0)} else 0.45

    examples = list(range(100))
    cal = Calibration(None, None, INFO, score=full, examples=examples, options={"screen": 10}, scorer_for=scorer_for)
    found = act.find(act.ActSpec(type="act"), cal)
    (part,) = parts
    assert len(part) == 10 and set(part) <= set(examples)
    (spec,) = found.specs
    assert spec.heads == {3: [0]} and found.score == 0.7 and found.baseline == 0.5
    assert found.notes["screened_on"] == {"examples": 10, "unpatched": 0.5} and found.notes["helped_alone"] == 2
    with pytest.raises(attnedit.AttneditError, match="screen"):
        act.find(act.ActSpec(type="act"), Calibration(None, None, INFO, score=full, options={"screen": 0}))
