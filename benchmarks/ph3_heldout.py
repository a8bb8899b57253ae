"""PH3 on held-out knowledge conflicts: memory rate of the default model, pruned by PH3 vs random heads.

    attnedit calibrate ph3-search --task lama-conflict --limit 256 --param prune=memory --out ph3-prune-memory.yaml
    attnedit calibrate ph3-search --task lama-conflict --limit 256 --param prune=context --out ph3-prune-context.yaml
    python benchmarks/ph3_heldout.py ph3-prune-memory.yaml ph3-prune-context.yaml

Calibration reads the task's train split (LAMA train facts); this script scores 300 examples of its
test split (LAMA dev facts) and prints a markdown table. Needs $ATTNEDIT_DATA_DIR (or ../shared/data).
"""

from __future__ import annotations

import random
import sys

import attnedit
from attnedit import evals
from attnedit.recipe import Recipe


def main(paths: list[str], n: int = 300, k: int = 5) -> None:
    model, tok = attnedit.load("smollm2-135m-instruct", dtype="float32", device="cpu")
    task = evals.load_task("lama-conflict")
    test = random.Random(0).sample(task.split("test"), n)
    encoded = evals.encode(task, test, tok)

    def rate(recipe) -> float:
        recs = evals.score(model, tok, task, test, encoded=encoded, recipe=recipe, batch_size=16, progress=False)
        return evals.metric(recs, task)["memory_rate"]

    rows = [("unpatched", rate(None))] + [(p, rate(Recipe.from_yaml(p))) for p in paths]
    every = [(layer, h) for layer in range(30) for h in range(9)]
    for seed in range(3):
        heads: dict[int, list[int]] = {}
        for layer, h in random.Random(seed).sample(every, k):
            heads.setdefault(layer, []).append(h)
        rows.append(
            (
                f"random {k} heads (seed {seed})",
                rate(Recipe.from_dict({"interventions": [{"type": "head_prune", "heads": heads}]})),
            )
        )
    print(f"| recipe | memory rate on {n} test conflicts |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
