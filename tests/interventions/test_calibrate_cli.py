"""`attnedit calibrate` end to end on a tiny model folder and a tiny task, and its clear failures."""

from __future__ import annotations

import json

import models
import pytest
import torch
import vlm
import yaml
from typer.testing import CliRunner

import attnedit
from attnedit.cli.main import app
from attnedit.recipe import Recipe

WORDS = "the cat dog car is big small red blue green left right".split()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = vlm.tokenizer()
    model = models.tiny("llama", vocab_size=len(tok), num_hidden_layers=3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _task(tmp_path, n_train: int):
    g = torch.Generator().manual_seed(0)

    def rows(n):
        out = []
        for _ in range(n):
            words = [WORDS[i] for i in torch.randint(0, len(WORDS), (5,), generator=g)]
            out.append(
                {"text": " ".join(words), "label": "positive" if "red" in words or "big" in words else "negative"}
            )
        return "\n".join(json.dumps(r) for r in out) + "\n"

    (tmp_path / "train.jsonl").write_text(rows(n_train))
    (tmp_path / "test.jsonl").write_text(rows(20))
    spec = {
        "name": "toy",
        "kind": "classification",
        "labels": {"negative": "no", "positive": "yes"},
        "template": "{text} ?",
        "chat": False,
        "local": {
            "format": "jsonl",
            "train": "train.jsonl",
            "test": "test.jsonl",
            "fields": {"text": "text"},
            "label": "label",
        },
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _recipe(tmp_path, body: str):
    path = tmp_path / "in.yaml"
    path.write_text(body)
    return path


def test_calibrate_zerotuning_writes_a_loadable_recipe_with_provenance(tmp_path, tiny_model_dir):
    task = _task(tmp_path, 40)
    src = _recipe(tmp_path, "interventions:\n  - {type: zerotuning, gamma: 2.0}\n")
    out = tmp_path / "out.yaml"
    args = [
        "calibrate",
        str(src),
        "--model",
        str(tiny_model_dir),
        "--task",
        str(task),
        "--limit",
        "24",
        "--out",
        str(out),
        "--param",
        "gammas=0.5,3",
        "--objective",
        "logprob",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# attnedit apply")
    rec = Recipe.from_yaml(out)
    prov = rec.provenance
    assert prov["model"] == str(tiny_model_dir) and len(prov["model_hash"]) == 64
    assert prov["task"] == str(task) and prov["split"] == "train" and prov["n_train"] == 40
    assert prov["n_examples"] == 19 and prov["n_heldout"] == 5  # 24 drawn, a fifth kept out of the search
    held = prov["heldout"]
    assert held["n"] == 5 and held["objective"] == "logprob" and held["metric"] == "accuracy"
    assert isinstance(held["baseline"], float) and isinstance(held["calibrated"], float)
    assert "held-out examples (5, logprob)" in result.output
    assert prov["seed"] == 0 and prov["objective"] == "logprob" and prov["tool"].startswith("attnedit ")
    (search,) = prov["searches"]
    assert search["method"] == "zerotuning" and len(search["candidates"]) >= 4 + 2  # 4 head indices profiled + grid
    assert all(isinstance(c["score"], float) for c in search["candidates"])
    model, _ = attnedit.load(str(tiny_model_dir), device="cpu")
    if rec.interventions:  # the chosen candidate applies to the model
        ids = torch.tensor([[1, 5, 6, 7]])
        with attnedit.patch(model, rec):
            model(input_ids=ids)
        assert prov["calibrated_score"] == pytest.approx(search["score"]) and search["score"] > search["baseline"]
    else:
        assert held["calibrated"] == held["baseline"] and search["why"]


def test_calibrate_act_respects_max_candidates(tmp_path, tiny_model_dir):
    task = _task(tmp_path, 30)
    src = _recipe(tmp_path, "interventions:\n  - {type: act, tau: 0.05}\n")
    out = tmp_path / "act.yaml"
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(src),
            "--model",
            str(tiny_model_dir),
            "--task",
            str(task),
            "--limit",
            "16",
            "--holdout",
            "0",
            "--max-candidates",
            "3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    (search,) = Recipe.from_yaml(out).provenance["searches"]
    assert [c["candidate"] for c in search["candidates"]] == [{"layer": 2, "head": h} for h in range(3)]


def test_too_few_examples_fail_clearly(tmp_path, tiny_model_dir):
    task = _task(tmp_path, 10)
    src = _recipe(tmp_path, "interventions:\n  - {type: zerotuning, gamma: 2.0}\n")
    out = tmp_path / "never.yaml"
    result = CliRunner().invoke(
        app, ["calibrate", str(src), "--model", str(tiny_model_dir), "--task", str(task), "--out", str(out)]
    )
    assert result.exit_code == 2 and "has 10 train examples; calibration needs at least 16" in result.output
    assert not out.exists()
    task = _task(tmp_path, 40)
    result = CliRunner().invoke(
        app,
        ["calibrate", str(src), "--model", str(tiny_model_dir), "--task", str(task), "--limit", "5", "--out", str(out)],
    )
    assert result.exit_code == 2 and "--limit 5 leaves 5" in result.output


def test_missing_task_and_bad_param_fail_clearly(tmp_path, tiny_model_dir):
    src = _recipe(tmp_path, "interventions:\n  - {type: act}\n")
    result = CliRunner().invoke(
        app, ["calibrate", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "x.yaml")]
    )
    assert result.exit_code == 2 and "needs --task" in result.output
    result = CliRunner().invoke(
        app, ["calibrate", str(src), "--model", str(tiny_model_dir), "--param", "k", "--out", str(tmp_path / "x.yaml")]
    )
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_replay_scorer_equals_the_eval_harness(tmp_path, tiny_model_dir):
    from attnedit import evals
    from attnedit.interventions import calibration as C

    task = evals.load_task(str(_task(tmp_path, 40)))
    model, tok = attnedit.load(str(tiny_model_dir), device="cpu", dtype="float32")
    examples = C.calibration_examples(task, 20, seed=1)
    score = C.task_scorer(
        model, tok, task, examples, objective="logprob", shots=0, seed=0, batch_size=6, backend="reference"
    )
    for recipe in (
        None,
        Recipe.from_dict({"interventions": [{"type": "act", "heads": {2: [1]}, "tau": 0.05}]}),
        Recipe.from_dict({"interventions": [{"type": "zerotuning", "gamma": 3.0, "layers": [1, 2]}]}),
    ):
        fast = score.records(recipe)
        slow = evals.score(model, tok, task, examples, recipe=recipe, backend="reference", batch_size=6, progress=False)
        assert [r["pred"] for r in fast] == [r["pred"] for r in slow]
        for a, b in zip(fast, slow):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def test_calibrate_mean_ablation_computes_means_over_train_prompts(tmp_path, tiny_model_dir):
    task = _task(tmp_path, 30)
    src = _recipe(tmp_path, "interventions:\n  - {type: head_prune, ablation: mean, heads: {1: [0, 2]}}\n")
    with pytest.raises(attnedit.RecipeError, match="needs .means."):
        attnedit.patch(attnedit.load(str(tiny_model_dir), device="cpu")[0], Recipe.from_yaml(src))
    out = tmp_path / "mean.yaml"
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(src),
            "--model",
            str(tiny_model_dir),
            "--task",
            str(task),
            "--limit",
            "16",
            "--holdout",
            "0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    (spec,) = Recipe.from_yaml(out).interventions
    assert spec.ablation == "mean" and sorted(spec.means[1]) == [0, 2] and len(spec.means[1][0]) == 16


def test_entropy_objective_ignores_labels(tmp_path, tiny_model_dir):
    import math

    from attnedit import evals
    from attnedit.interventions import calibration as C

    task = evals.load_task(str(_task(tmp_path, 40)))
    model, tok = attnedit.load(str(tiny_model_dir), device="cpu", dtype="float32")
    examples = C.calibration_examples(task, 16, seed=0)
    score = C.task_scorer(model, tok, task, examples, objective="entropy", shots=0, seed=0, batch_size=8, backend=None)
    recs = score.records(None)
    want = 0.0
    for r in recs:
        p = [math.exp(s) for s in r["scores"]]
        p = [x / sum(p) for x in p]
        want -= -sum(x * math.log(x) for x in p) / len(recs)
    assert score(None) == pytest.approx(want)
    flipped = [
        type(e)(e.id, e.fields, e.choices, (1 - e.gold[0],), e.targets, e.label) for e in examples
    ]  # other labels
    assert C.task_scorer(model, tok, task, flipped, objective="entropy", shots=0, seed=0, batch_size=8, backend=None)(
        None
    ) == pytest.approx(want)
