"""Print the README's results table from the evidence runs' results.json files.

    python benchmarks/evidence/table.py [benchmarks/results/evidence]

One row per task of every run: baseline, patched, difference with its 95% interval, n, and the
command that produced it (recorded in results.json by `attnedit eval`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(root: Path) -> list[str]:
    out = []
    for path in sorted(root.glob("*/results.json")):
        doc = json.loads(path.read_text())
        for name, t in doc["tasks"].items():
            d = t["difference"]
            lo, hi = d["ci95"]
            mark = " *" if lo > 0 or hi < 0 else ""
            shots = f"{doc['shots']}-shot" if t["kind"] in ("classification", "multiple_choice") else ""
            out.append(
                f"| {name} {shots} | {doc['recipe_name']} | {t['metric']} | {t['baseline']['value']:.3f} | "
                f"{t['patched']['value']:.3f} | {d['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark} | {t['n']} | "
                f"`{doc.get('command') or '(see benchmarks/evidence/run.sh)'}` |"
            )
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/evidence")
    print("| task | recipe | metric | baseline | patched | difference [95% CI] | n | command |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows(root):
        print(row)
    print("\n`*`: the interval excludes zero.")


if __name__ == "__main__":
    main()
