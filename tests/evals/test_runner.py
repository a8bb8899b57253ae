"""The paired run: resume after an interruption, identical reruns, settings checks, merged output."""

from __future__ import annotations

import json

import pytest

import attnedit
from attnedit.evals import TaskError, load_task, metric, runner, score

RECIPE = "interventions: [{type: zerotuning, gamma: 4.0}]"


def _run(model, tok, tasks, out, **kw):
    settings = runner.Settings(batch_size=3, shots=1, seed=2, n_boot=500, identity={"case": "x"}, **kw)
    return runner.run_tasks(model, tok, attnedit.Recipe.from_str(RECIPE), tasks, out, settings, progress=False)


def _samples(out):
    return sorted(p.name for p in out.glob("samples_*.jsonl")), {
        p.name: p.read_text() for p in out.glob("samples_*.jsonl")
    }


def test_results_are_paired_and_match_separate_scoring(tiny, toy, tmp_path):
    model, tok = tiny
    task = load_task(str(toy))
    res = _run(model, tok, [task], tmp_path / "out")
    r = res["toy"]
    examples = task.split("test")
    base = score(model, tok, task, examples, shots=1, seed=2, batch_size=5, progress=False)
    edit = score(model, tok, task, examples, shots=1, seed=2, recipe=attnedit.Recipe.from_str(RECIPE), progress=False)
    assert r["n"] == len(examples) == 20
    assert r["baseline"]["accuracy"] == metric(base, task)["accuracy"]
    assert r["patched"]["accuracy"] == metric(edit, task)["accuracy"]
    assert r["difference"]["value"] == pytest.approx(r["patched"]["value"] - r["baseline"]["value"])
    lo, hi = r["difference"]["ci95"]
    assert lo <= r["difference"]["value"] <= hi
    m = r["difference"]["mcnemar"]
    assert m["b"] == sum(x["correct"] and not y["correct"] for x, y in zip(base, edit))
    assert m["c"] == sum(y["correct"] and not x["correct"] for x, y in zip(base, edit))
    assert set(r["time_s"]) == set(r["peak_memory_mb"]) == {"baseline", "patched"}
    assert r["peak_memory_mb"]["baseline"] > 0
    lines = (tmp_path / "out/samples_toy.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["index"] for row in rows] == list(range(20))
    assert rows[0]["prompt"].count("review :") == 2  # one demonstration + the example
    for row, b in zip(rows, base):
        assert row["baseline"]["scores"] == pytest.approx(b["scores"], abs=2e-5)


def test_interrupted_run_resumes_to_the_same_numbers(tiny, toy, tmp_path, monkeypatch):
    model, tok = tiny
    tasks = [load_task(str(toy)), load_task("facts-conflict")]
    clean = _run(model, tok, tasks, tmp_path / "clean", limit=12)

    calls = {"n": 0}
    real = runner._score_pair

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # in the second task
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "_score_pair", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tok, tasks, tmp_path / "cut", limit=12)
    assert not (tmp_path / "cut/results.json").exists() and not list((tmp_path / "cut").glob("samples_*"))
    work = tmp_path / "cut" / runner.WORK
    with open(work / "facts-conflict.rank0.jsonl", "a") as f:
        f.write('{"batch": 3, "rows": [{"ind')  # a line torn by the interruption
    monkeypatch.setattr(runner, "_score_pair", real)
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(runner, "_score_pair", counting)
    resumed = _run(model, tok, tasks, tmp_path / "cut", limit=12)
    assert counted["n"] == 8 - 5  # 4 batches per task; 5 were done
    for name in clean:
        for key in ("baseline", "patched", "difference", "n"):
            assert resumed[name][key] == clean[name][key]
    assert _samples(tmp_path / "clean") == _samples(tmp_path / "cut")


def test_rerun_gives_the_same_numbers(tiny, toy, tmp_path):
    model, tok = tiny
    tasks = [load_task(str(toy))]
    a = _run(model, tok, tasks, tmp_path / "a")
    b = _run(model, tok, tasks, tmp_path / "b")
    for key in ("baseline", "patched", "difference"):
        assert a["toy"][key] == b["toy"][key]
    assert _samples(tmp_path / "a") == _samples(tmp_path / "b")


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    runner.claim(tmp_path, {"seed": 0, "shots": 0})
    runner.claim(tmp_path, {"seed": 0, "shots": 0})  # the same run: resume
    with pytest.raises(TaskError, match="holds a run with other settings \\(shots: 0 then, 4 now\\)"):
        runner.claim(tmp_path, {"seed": 0, "shots": 4})
    runner.clear(tmp_path)
    runner.claim(tmp_path, {"seed": 0, "shots": 4})
