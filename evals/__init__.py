"""attnedit.evals: score tasks with and without a recipe, on identical inputs.

    from attnedit.evals import load_task, score, metric

    task = load_task("sst2", data_dir="../shared/data")        # or "facts-conflict" (no data needed)
    examples = task.split("test")[:200]
    base = score(model, tokenizer, task, examples, shots=0, seed=0, batch_size=8)
    edit = score(model, tokenizer, task, examples, recipe=recipe)   # patched with attnedit.patch
    metric(base, task)["value"], metric(edit, task)["value"]

`encode` tokenizes once; pass its result as `encoded=` to score many recipes on
the same prompts. `run_eval` (used by `attnedit eval`) adds the paired
statistics, resumable output files and multi-process sharding.
"""

from .prompts import Encoded, demonstrations, encode
from .records import metric, per_example, score
from .spec import TaskError, TaskSpec, builtin_specs
from .task import Example, Task, load_task


def builtin_tasks() -> list[str]:
    """Names of the built-in tasks (besides ``bigbench:<name or path>``)."""
    return list(builtin_specs())


__all__ = [
    "Encoded",
    "Example",
    "Task",
    "TaskError",
    "TaskSpec",
    "builtin_tasks",
    "demonstrations",
    "encode",
    "load_task",
    "metric",
    "per_example",
    "score",
]
