"""PASTA's prompt handling: markers or character ranges -> left-padded encoding + token spans."""

from __future__ import annotations

import models
import pytest
import torch
import vlm

import attnedit
from attnedit.errors import AttneditError
from attnedit.interventions import pasta
from attnedit.recipe import Recipe


@pytest.fixture(scope="module")
def tok():
    return vlm.tokenizer()  # a fast word-level tokenizer with offsets


def test_strip_markers_gives_clean_text_and_ranges():
    text, ranges = pasta.strip_markers("the cat <<is big>> and <<red>> .")
    assert text == "the cat is big and red ."
    assert [text[a:b] for a, b in ranges] == ["is big", "red"]
    text, ranges = pasta.strip_markers("[[a]] b", ("[[", "]]"))
    assert (text, ranges) == ("a b", [(0, 1)])


@pytest.mark.parametrize(
    "bad, why",
    [
        ("the <<cat is", "never closed"),
        ("the cat>> is", "never opened"),
        ("<<the <<cat>> is>>", "do not nest"),
        ("the <<>> cat", "empty span"),
    ],
)
def test_markers_that_do_not_close_fail_clearly(bad, why, tok):
    with pytest.raises(AttneditError, match=why):
        pasta.prepare(tok, ["fine <<text>> here", bad])


def test_prepare_maps_spans_to_tokens_with_left_padding(tok):
    enc, spans = pasta.prepare(tok, ["the cat <<is big>> .", "<<what>> is this image ? please look"])
    ids = enc["input_ids"]
    T = ids.shape[1]
    assert "offset_mapping" not in enc and enc["attention_mask"][0, 0] == 0  # left padded
    words = [tok.convert_ids_to_tokens(ids[b].tolist()) for b in range(2)]
    (s0, e0), open0 = spans[0]
    assert words[0][s0:e0] == ["is", "big"] and open0 == (T, pasta._OPEN_END)
    (s1, e1), _ = spans[1]
    assert words[1][s1:e1] == ["what"]


def test_prepare_with_character_ranges(tok):
    text = "the cat is big ."
    enc, spans = pasta.prepare(tok, [text], ranges=[[(4, 7)]])
    words = tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    (s, e), _ = spans[0]
    assert words[s:e] == ["cat"]
    with pytest.raises(AttneditError, match="not inside the text"):
        pasta.prepare(tok, [text], ranges=[[(4, 70)]])


def test_prepare_reads_the_recipes_markers_and_steers(tok):
    recipe = Recipe.from_dict({"interventions": [{"type": "pasta", "heads": {1: [0, 1]}, "markers": ["[", "]"]}]})
    enc, spans = pasta.prepare(tok, ["the cat [is big] .", "what [is] this ?"], recipe)
    model = models.tiny("llama", vocab_size=len(tok))
    with torch.no_grad():
        plain = model(**enc).logits
        with attnedit.patch(model, recipe, spans=spans):
            steered = model(**enc).logits
            out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert not torch.allclose(plain[:, -1], steered[:, -1])
    assert out.shape == (2, enc["input_ids"].shape[1] + 3)
