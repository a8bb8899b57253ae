"""`attnedit eval` on the real default model (SmolLM2-135M-Instruct, CPU): SST-2 against a hand-written loop."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from attnedit.cli.main import app

pytestmark = pytest.mark.slow


def test_sst2_baseline_equals_a_hand_written_loop(smollm2, data_root, tmp_path):
    model, tok = smollm2
    recipe = tmp_path / "zt.yaml"
    recipe.write_text("name: zt-test\ninterventions: [{type: zerotuning, gamma: 2.0, layers: '2:'}]\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "eval",
            str(recipe),
            "--tasks",
            "sst2",
            "--limit",
            "64",
            "--data-dir",
            str(data_root),
            "--out",
            str(out),
            "--batch-size",
            "16",
            "--dtype",
            "float32",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    sst2 = doc["tasks"]["sst2"]
    assert sst2["n"] == 64 and (out / "samples_sst2.jsonl").is_file()

    # the same 64 reviews, one at a time, prompt written out by hand
    lines = (data_root / "fewshot/sst2/stsa.binary.test").read_text(encoding="utf-8").splitlines()[:64]
    words = [
        tok("negative", add_special_tokens=False).input_ids[0],
        tok("positive", add_special_tokens=False).input_ids[0],
    ]
    correct = 0
    for line in lines:
        label, text = int(line[0]), line[2:].strip()
        messages = [{"role": "user", "content": f"Review: {text}\nSentiment:"}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        correct += int(logits[words[1]] > logits[words[0]]) == label
    assert sst2["baseline"]["accuracy"] == correct / 64
    assert 0.6 < sst2["baseline"]["accuracy"] < 0.95  # the model is far from chance on SST-2
