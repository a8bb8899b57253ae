"""Run every kernel check under Triton's CPU interpreter and write the results as JSON.

Started by test_triton_interpret.py in a fresh process with TRITON_INTERPRET=1
(the variable must be set before Triton is first imported). Usage:
``TRITON_INTERPRET=1 python interpret_worker.py OUT.json``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for kernel_cases

import kernel_cases as kc  # noqa: E402
import torch  # noqa: E402


def main(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    from attnedit.kernels import triton_ops as ops
    from attnedit.kernels import triton_prefill

    jobs = {}
    for spec in kc.CASES:
        jobs[f"attention/{spec.name}"] = lambda s=spec: kc.check_attention(
            ops, s, seed=11, config=kc.tiles(s), splits=3
        )
    for spec in kc.MASS_CASES:
        jobs[f"masses/{spec.name}"] = lambda s=spec: kc.check_masses(ops, s, seed=3, config=kc.tiles(s), splits=2)
    for spec in kc.COLSUM_CASES:
        jobs[f"colsum/{spec.name}"] = lambda s=spec: kc.check_colsum(ops, s, seed=5, config=kc.tiles(s))
    for spec in kc.BULK_CASES:
        jobs[f"bulk/{spec.name}"] = lambda s=spec: kc.check_bulk(triton_prefill, ops, s, seed=9, config=kc.tiles(s))
    jobs["member_list"] = lambda: kc.check_member_list(triton_prefill)
    jobs["inert"] = lambda: kc.check_inert(ops)
    jobs["fallback"] = lambda: kc.check_fallback(ops)
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = job()
        except Exception:  # reported by the test that owns this job
            results[name] = {"error": traceback.format_exc()}
        print(name, results[name], flush=True)
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
