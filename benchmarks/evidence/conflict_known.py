"""Context-following on the conflicts whose fact the unpatched model knows.

    python benchmarks/evidence/conflict_known.py CONFLICT_RUN RECALL_RUN [--out FILE.json]

CONFLICT_RUN and RECALL_RUN are `attnedit eval` output folders of one recipe that hold a knowledge-
conflict task (a context states a counterfactual object) and its recall task (the same facts, no
context). A conflict only tests the model's memory when the model holds the fact: this keeps the
facts whose recall prompt the *unpatched* model answers with the true object, and reports the context
rate of both runs on them, the difference with a paired bootstrap 95% interval and McNemar's test
(the same statistics as `attnedit eval`). Facts are matched by their `id` (file:line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnedit.evals.stats import mcnemar, mean_diff_interval
from attnedit.files import slug  # the samples file's name, as `attnedit eval` writes it


def _samples(run: Path, kind: str) -> tuple[str, dict[str, dict]]:
    results = run / "results.json"
    if not results.is_file():
        raise SystemExit(f"error: {results} not found: give a folder written by `attnedit eval`")
    doc = json.loads(results.read_text())
    names = [n for n, t in doc["tasks"].items() if t["kind"] == "knowledge_conflict" and t["metric"] == kind]
    if len(names) != 1:
        raise SystemExit(f"error: {run}: expected one knowledge-conflict task with metric {kind}, found {names}")
    name = names[0]
    path = run / f"samples_{slug(name)}.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (the per-example file of task {name!r})")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return name, {r["id"]: r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("conflict_run", type=Path)
    ap.add_argument("recall_run", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    conflict_name, conflict = _samples(a.conflict_run, "context_rate")
    recall_name, recall = _samples(a.recall_run, "memory_rate")
    known = [i for i, r in recall.items() if r["baseline"]["pred"] == 1 and i in conflict]
    if not known:
        raise SystemExit("error: no fact is recalled by the unpatched model: nothing to report")
    base = [conflict[i]["baseline"]["pred"] == 0 for i in known]
    patched = [conflict[i]["patched"]["pred"] == 0 for i in known]
    lo, hi = mean_diff_interval([float(x) for x in base], [float(x) for x in patched])
    out = {
        "conflict_task": conflict_name,
        "recall_task": recall_name,
        "n_known": len(known),
        "n_conflicts": len(conflict),
        "context_rate": {"baseline": sum(base) / len(known), "patched": sum(patched) / len(known)},
        "difference": {
            "value": (sum(patched) - sum(base)) / len(known),
            "ci95": [lo, hi],
            "mcnemar": mcnemar(base, patched),
        },
    }
    text = json.dumps(out, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
