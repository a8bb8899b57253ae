"""Task specs and data: built-ins, sources, splits, and every bad input failing with file, line and field."""

from __future__ import annotations

import json
import os

import evalkit
import pytest

from attnedit.evals import TaskError, builtin_tasks, load_task
from attnedit.evals.facts import FACTS
from attnedit.evals.sources import carve

FEWSHOT = ("sst2", "agnews", "trec", "cb", "rte")


@pytest.mark.parametrize("name", FEWSHOT)
def test_builtin_fewshot_tasks_read_the_shared_files(name, data_root):
    task = load_task(name, data_dir=data_root)
    assert task.kind == "classification"
    sizes = {"sst2": (6920, 1821), "agnews": (2000, 5600), "trec": (5452, 500), "cb": (250, 56), "rte": (2490, 277)}[
        name
    ]
    assert (len(task.split("train")), len(task.split("test"))) == sizes
    for ex in task.split("test")[:50]:
        assert ex.label in task.labels and ex.choices == tuple(task.spec.labels.values())


def test_first_sst2_rows_match_the_file(data_root):
    lines = (data_root / "fewshot/sst2/stsa.binary.test").read_text().splitlines()[:5]
    task = load_task("sst2", data_dir=data_root)
    for line, ex in zip(lines, task.split("test")):
        assert ex.fields["text"] == line[2:].strip()
        assert ex.label == ("positive" if line[0] == "1" else "negative")


def test_agnews_slice_is_fixed_and_disjoint(data_root):
    a = load_task("agnews", data_dir=data_root)
    b = load_task("agnews", data_dir=data_root)
    train, test = {e.id for e in a.split("train")}, {e.id for e in a.split("test")}
    assert not train & test and len(train | test) == 7600
    assert [e.id for e in a.split("train")] == [e.id for e in b.split("train")]
    lines = [int(e.id.split(":")[1]) for e in a.split("test")]
    assert lines == sorted(lines) and lines[0] >= 2  # file order, header skipped


def test_carve_keeps_order_and_depends_only_on_seed():
    from attnedit.evals.spec import Carve

    rows = list(range(100))
    tr, te = carve(rows, Carve(train=0.3, seed=0))
    assert len(tr) == 30 and sorted(tr + te) == rows and tr == sorted(tr) and te == sorted(te)
    assert carve(rows, Carve(train=0.3, seed=0)) == (tr, te)
    assert carve(rows, Carve(train=0.3, seed=1))[0] != tr


def test_every_builtin_parses():
    assert {
        "sst2",
        "agnews",
        "trec",
        "cb",
        "rte",
        "facts-conflict",
        "facts-recall",
        "lama-conflict",
        "lama-recall",
    } <= set(builtin_tasks())


def test_facts_tasks_need_no_data(monkeypatch):
    monkeypatch.delenv("ATTNEDIT_DATA_DIR", raising=False)
    conflict = load_task("facts-conflict")
    recall = load_task("facts-recall")
    assert conflict.metric == "context_rate" and recall.metric == "memory_rate"
    n = sum(len(t[1]) for t in FACTS.values())
    assert len(conflict.split("train")) + len(conflict.split("test")) == n
    for c, r in zip(conflict.split("test"), recall.split("test")):
        assert c.id == r.id and c.choices == r.choices  # the same facts and counterfactual objects
        ctx, mem = c.choices
        assert ctx != mem and c.fields["context"].startswith(c.fields["question"] + " " + ctx)
        assert c.gold == (0,) and r.gold == (1,) and r.fields["context"] == ""
        subject, rel = c.fields["subject"], c.fields["relation"]
        assert FACTS[rel][1][subject] == mem


def test_relations_split_the_facts():
    some = load_task("facts-conflict", local={"relations": ["capital", "author"]})
    rels = {e.fields["relation"] for e in some.split("train") + some.split("test")}
    assert rels == {"capital", "author"}
    with pytest.raises(TaskError, match="relations \\['nope'\\] are not in the built-in fact table"):
        load_task("facts-conflict", local={"relations": ["nope"]})


def test_lama_conflict_by_relation(data_root):
    task = load_task("lama-conflict", data_dir=data_root, local={"relations": ["P36", "P17"]})
    test = task.split("test")
    assert {e.fields["relation"] for e in test} == {"P36", "P17"}
    assert len(test) == sum(1 for r in ("P36", "P17") for _ in open(data_root / f"fewshot/lama/{r}/dev.jsonl"))
    ex = next(e for e in test if e.fields["relation"] == "P36")
    assert ex.fields["question"].startswith("The capital of ") and ex.fields["question"].endswith(" is")


def test_bigbench_tasks(data_root):
    nav = load_task("bigbench:navigate", data_dir=data_root)
    assert nav.kind == "multiple_choice" and len(nav.split("train")) == 200 and len(nav.split("test")) == 800
    assert nav.spec.instruction.startswith("If you follow these instructions")
    conflict = load_task("bigbench:contextual_parametric_knowledge_conflicts", data_dir=data_root)
    assert conflict.kind == "knowledge_conflict"
    raw = json.loads((data_root / "bigbench/contextual_parametric_knowledge_conflicts.json").read_text())["examples"]
    first = next(e for e in conflict.split("train") + conflict.split("test") if e.id.endswith("examples[0]"))
    assert first.choices[0] == raw[0]["target"] and first.gold == (0,)
    by_path = load_task(f"bigbench:{data_root / 'bigbench/navigate.json'}")
    assert [e.id for e in by_path.split("test")] == [e.id for e in nav.split("test")]


def test_bigbench_task_with_a_relative_data_dir(data_root, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    rel = os.path.relpath(data_root, tmp_path / "work")  # e.g. ../../shared/data
    nav = load_task("bigbench:navigate", data_dir=rel)
    assert len(nav.split("test")) == 800


# --------------------------------------------------------------------------- bad input


def test_unknown_task_lists_the_builtins():
    with pytest.raises(TaskError, match="unknown task 'sst3'.*sst2.*bigbench:"):
        load_task("sst3")


def test_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(TaskError, match=f"data file not found: {tmp_path}/fewshot/sst2/stsa.binary.test"):
        load_task("sst2", data_dir=tmp_path)
    with pytest.raises(TaskError, match="data folder .*nowhere does not exist"):
        load_task("sst2", data_dir=tmp_path / "nowhere")


def test_missing_lama_folder(tmp_path):
    with pytest.raises(TaskError, match=f"LAMA relations file not found: {tmp_path}/fewshot/lama/relations.jsonl"):
        load_task("lama-conflict", data_dir=tmp_path)


def _toy_with(tmp_path, test_text: str, spec: str = evalkit.TOY_SPEC):
    path = evalkit.toy_task(tmp_path / "t", spec=spec)
    (path.parent / "test.jsonl").write_text(test_text)
    return path


def test_malformed_json_line(tmp_path):
    path = _toy_with(tmp_path, '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0\n')
    with pytest.raises(TaskError, match="test.jsonl:2: not valid JSON"):
        load_task(str(path))


def test_bad_label_names_line_and_allowed(tmp_path):
    path = _toy_with(tmp_path, '{"sentence": "good", "label": 1}\n\n{"sentence": "bad", "label": 7}\n')
    with pytest.raises(TaskError, match=r"test.jsonl:3: label 7 is not one of \['0', '1'\]"):
        load_task(str(path))


def test_missing_column_names_line(tmp_path):
    path = _toy_with(tmp_path, '{"text": "good", "label": 1}\n')
    with pytest.raises(TaskError, match="test.jsonl:1: no column 'sentence'"):
        load_task(str(path))


def test_regex_and_csv_rows(tmp_path):
    (tmp_path / "a.txt").write_text("1 a fine film\n0 a dull film\nno label here\n")
    spec = evalkit.TOY_SPEC.replace("format: jsonl", "format: regex\n  pattern: '(?P<label>[01]) (?P<sentence>.*)'")
    spec = spec.replace("test.jsonl", str(tmp_path / "a.txt"))
    path = _toy_with(tmp_path, "", spec=spec)
    with pytest.raises(TaskError, match="a.txt:3: does not match the task's pattern"):
        load_task(str(path))
    (tmp_path / "b.csv").write_text('sentence,label\nfine film,1\n"dull, weak",0,extra\n')
    spec = evalkit.TOY_SPEC.replace("format: jsonl", "format: csv").replace("test.jsonl", str(tmp_path / "b.csv"))
    path = _toy_with(tmp_path, "", spec=spec)
    with pytest.raises(TaskError, match=r"b.csv:3: has 3 columns, expected 2 \(sentence, label\)"):
        load_task(str(path))


def test_empty_split(tmp_path):
    path = _toy_with(tmp_path, "\n\n")
    with pytest.raises(TaskError, match="'toy': the test split is empty"):
        load_task(str(path))


def test_spec_problems_name_file_line_and_field(tmp_path):
    bad = evalkit.TOY_SPEC.replace("kind: classification", "kind: clasification").replace(
        "chat: false", "chat: false\ncolour: red"
    )
    path = _toy_with(tmp_path, "", spec=bad)
    with pytest.raises(TaskError) as err:
        load_task(str(path))
    text = str(err.value)
    assert f"{path}:2: kind:" in text and "classification" in text
    assert f"{path}:6: colour: unknown field" in text


def test_template_slot_the_rows_lack(tmp_path):
    path = _toy_with(tmp_path, '{"sentence": "good", "label": 1}\n', spec=evalkit.TOY_SPEC.replace("{text}", "{txt}"))
    with pytest.raises(TaskError, match=r"the template uses \['txt'\]"):
        load_task(str(path))


def test_extends_overrides_fields(tmp_path):
    path = evalkit.toy_task(tmp_path / "t")
    child = path.parent / "child.yaml"
    child.write_text("extends: toy.yaml\nname: toy-chat\nchat: true\n")
    task = load_task(str(child))
    assert task.name == "toy-chat" and task.spec.chat is True and task.spec.labels == {"neg": "bad", "pos": "good"}


def test_hub_source_without_data_dir_needs_datasets(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *a, **k)

    monkeypatch.delenv("ATTNEDIT_DATA_DIR", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(TaskError, match="pip install datasets"):
        load_task("sst2")


def test_yaml_booleans_in_labels_get_a_clear_message(tmp_path):
    path = _toy_with(
        tmp_path, "", spec=evalkit.TOY_SPEC.replace("labels: {neg: bad, pos: good}", "labels: {no: bad, yes: good}")
    )
    with pytest.raises(
        TaskError, match=f"{path}:3: labels: YAML reads yes/no/true/false/on/off as booleans: quote them"
    ):
        load_task(str(path))
