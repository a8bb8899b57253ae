"""Print the README's results table from the evidence runs' results.json files.

    python benchmarks/evidence/table.py [benchmarks/results/evidence]

One row per task of every run: baseline, patched, difference with its 95% interval, n, the device,
dtype and kernels, the calibration budget and time (from the recipe's provenance, when the recipe
is one of the calibrated ones in the folder's `recipes/`), the evaluation time, and the command that
produced it (recorded in results.json by `attnedit eval`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _recipe(doc: dict) -> str:
    """The recipe as the command named it (a built-in name or a path), else its name."""
    words = (doc.get("command") or "").split()[2:]
    flags = {"--plot", "--force", "--json", "--chat", "--no-chat"}
    i = 0
    while i < len(words):
        if words[i].startswith("-"):
            i += 1 if words[i] in flags or "=" in words[i] else 2
            continue
        return Path(words[i]).stem
    return doc["recipe_name"]


def _where(doc: dict) -> str:
    """Device, dtype and kernels of a run, e.g. 'cuda fp32 triton'."""
    device = str(doc.get("device") or "?").split(":")[0]
    dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(doc.get("dtype")), "?")
    return f"{device} {dtype} {doc.get('backend') or '?'}"


def _calibration(doc: dict, recipes: Path) -> str:
    """'1024 + 256 held out, 500 s' from the calibrated recipe's provenance; 'uncalibrated' otherwise."""
    path = recipes / f"{_recipe(doc)}.yaml"
    if not path.is_file():
        return "uncalibrated"
    import yaml  # noqa: PLC0415  (only this column needs it)

    prov = (yaml.safe_load(path.read_text()) or {}).get("provenance") or {}
    if "n_examples" not in prov:
        return "uncalibrated"
    held = f" + {prov['n_heldout']} held out" if prov.get("n_heldout") else ""
    return f"{prov['n_examples']}{held}, {prov.get('elapsed_s', 0):.0f} s"


def _eval_time(t: dict) -> str:
    """'3.8 / 4.7' seconds: the baseline and patched scoring times of one task."""
    times = t.get("time_s") or {}
    if "baseline" not in times:
        return "?"
    return f"{times['baseline']:.1f} / {times['patched']:.1f}"


KIND_ORDER = {"classification": 0, "multiple_choice": 1, "knowledge_conflict": 2}
TASK_ORDER = ["sst2", "agnews", "trec", "cb", "rte"]


def rows(root: Path) -> list[str]:
    """Classification first (SST-2, AGNews, TREC, CB, RTE; zero-shot before few-shot), then multiple
    choice, then knowledge conflicts."""
    found = []
    recipes = root / "recipes"
    for path in sorted(root.glob("*/results.json")):
        doc = json.loads(path.read_text())
        for name, t in doc["tasks"].items():
            d = t["difference"]
            lo, hi = d["ci95"]
            mark = " *" if lo > 0 or hi < 0 else ""
            shots = f" {doc['shots']}-shot" if t["kind"] in ("classification", "multiple_choice") else ""
            line = (
                f"| {name}{shots} | {_recipe(doc)} | {t['metric']} | {t['baseline']['value']:.3f} | "
                f"{t['patched']['value']:.3f} | {d['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark} | {t['n']} | "
                f"{_where(doc)} | {_calibration(doc, recipes)} | {_eval_time(t)} | "
                f"`{doc.get('command') or '(see benchmarks/evidence/run.sh)'}` |"
            )
            task_rank = TASK_ORDER.index(name) if name in TASK_ORDER else len(TASK_ORDER)
            found.append(((KIND_ORDER.get(t["kind"], 9), task_rank, name, doc["shots"], path.parent.name), line))
    return [line for _, line in sorted(found)]


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/evidence")
    if not any(root.glob("*/results.json")):
        raise SystemExit(f"error: no */results.json under {root}: give the folder that holds the `attnedit eval` runs")
    print(
        "| task | recipe | metric | baseline | patched | difference [95% CI] | n | run on | "
        "calibrated on (searched + held out, time) | eval s (base / patched) | command |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows(root):
        print(row)
    print("\n`*`: the interval excludes zero.")


if __name__ == "__main__":
    main()
