"""POPE-style yes/no questions on a tiny random LLaVA (CLIP vision tower), with images made here."""

from __future__ import annotations

import json

import evalkit
import models
import pytest
import torch

import attnedit
from attnedit.evals import TaskError, encode, load_task, metric, score

pytest.importorskip("PIL", reason="pope tasks read images with Pillow")

SPEC = """\
name: pope-toy
kind: pope
labels: {"yes": "yes", "no": "no"}
template: "{image}\\nis there a {object} in the image ? answer yes or no ."
chat: false
local:
  format: jsonl
  train: pope.jsonl
  test: pope.jsonl
  fields: {image: image, object: object}
  label: label
"""
OBJECTS = ["dog", "cat", "car", "tree", "cup", "bird"]


@pytest.fixture(scope="module")
def llava():
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = evalkit.word_tokenizer(
        evalkit.vocabulary_texts() + [" ".join(OBJECTS) + " is there a in the image ? answer yes or no ."]
    )
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=models.tiny_config("llama", vocab_size=len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


@pytest.fixture
def pope(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 36, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "object": OBJECTS[i % len(OBJECTS)], "label": "yes" if i % 3 else "no"})
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pope.yaml").write_text(SPEC)
    return tmp_path / "pope.yaml"


def test_pope_scores_match_a_single_unpadded_forward(llava, pope):
    model, processor = llava
    task = load_task(str(pope))
    examples = task.split("test")
    assert examples[0].fields["image"] == str(pope.parent / "img/0.png")  # paths are beside the data file
    recs = score(model, processor, task, examples, batch_size=4, progress=False)
    one = score(model, processor, task, examples, batch_size=1, progress=False)
    yes, no = (processor.tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
    from attnedit.evals.vision import load_image

    for ex, rec, single in zip(examples, recs, one):
        text = "<image>\nis there a " + ex.fields["object"] + " in the image ? answer yes or no ."
        batch = processor(text=[text], images=[load_image(ex.fields["image"])], return_tensors="pt")
        assert (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 4
        with torch.no_grad():
            logp = model(**batch).logits[0, -1].log_softmax(-1)
        assert rec["scores"] == pytest.approx([logp[yes].item(), logp[no].item()], abs=1e-4)
        assert single["scores"] == pytest.approx(rec["scores"], abs=1e-4)
    m = metric(recs, task)
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio", "macro_f1"} <= set(m)
    assert m["yes_ratio"] == sum(r["pred"] == 0 for r in recs) / len(recs)


def test_pope_with_a_recipe_and_errors(llava, pope):
    model, processor = llava
    task = load_task(str(pope))
    examples = task.split("test")[:4]
    base = score(model, processor, task, examples, progress=False)
    rec = attnedit.Recipe.from_str("interventions: [{type: head_prune, heads: {1: [0, 1, 2, 3]}}]")
    edit = score(model, processor, task, examples, recipe=rec, progress=False)
    assert max(abs(a - b) for x, y in zip(base, edit) for a, b in zip(x["scores"], y["scores"])) > 1e-4
    with pytest.raises(TaskError, match="pope tasks: those are zero-shot|those are zero-shot"):
        encode(task, examples, processor, shots=1)
    with pytest.raises(TaskError, match="needs a vision-language model"):
        score(model, processor.tokenizer, task, examples, progress=False)
