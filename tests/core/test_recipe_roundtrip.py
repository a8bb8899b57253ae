"""Recipes written by attnedit (calibrate, to_yaml) load back as the same recipe."""

from __future__ import annotations

import pytest

from attnedit import Recipe


@pytest.mark.parametrize(
    "method, extra", [("act", {"beta": 0.4, "tau": 0.1}), ("zerotuning", {"gamma": 2.0}), ("head_prune", {})]
)
def test_head_map_recipe_round_trips(method, extra):
    # ACT's default `layers` is "2:"; a head map names its own layers, so the YAML must not carry both.
    rec = Recipe.from_dict({"interventions": [{"type": method, "heads": {2: [1, 3], 7: [0]}, **extra}]})
    again = Recipe.from_str(rec.to_yaml())
    assert again.hash() == rec.hash()
    assert "layers" not in again.to_dict()["interventions"][0]


def test_layer_range_with_head_list_keeps_its_layers():
    rec = Recipe.from_dict({"interventions": [{"type": "zerotuning", "layers": "4:", "heads": [0, 2], "gamma": 2.0}]})
    assert Recipe.from_str(rec.to_yaml()).to_dict()["interventions"][0]["layers"] == "4:"
