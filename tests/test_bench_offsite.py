"""The offsite benchmark's recipe choice: made on the validation blocks, reported on the test blocks."""

from __future__ import annotations

from dataclasses import asdict

from bench.offsite import Recipe, select_recipe


def _result(validation: float, test: float, gain: float) -> dict:
    return {"plugin_validation": validation, "plugin": test, "plugin_gain_recovered": gain}


def test_the_recipe_is_chosen_on_validation_even_when_another_scores_better_on_test():
    default = Recipe("lora", 20, 3e-3, 8)
    point = {"lora": _result(60.0, 50.0, 0.7), "plugin_gain_recovered_lora": 0.7}
    r16 = {"recipe": asdict(Recipe("lora", 20, 3e-3, 16)), **_result(55.0, 52.0, 0.65)}
    selection = select_recipe(default, point, [r16])
    assert selection["recipe"] == r16["recipe"]
    assert (selection["plugin"], selection["plugin_gain_recovered"]) == (52.0, 0.65)
    assert [c["recipe"]["lora_r"] for c in selection["candidates"]] == [8, 16]


def test_the_default_recipe_stays_when_nothing_beats_it_on_validation():
    default = Recipe("lora", 20, 3e-3, 8)
    point = {"lora": _result(55.0, 50.0, 0.7), "plugin_gain_recovered_lora": 0.7}
    r16 = {"recipe": asdict(Recipe("lora", 20, 3e-3, 16)), **_result(56.0, 45.0, 0.8)}
    selection = select_recipe(default, point, [r16])
    assert selection["recipe"] == asdict(default) and selection["plugin_gain_recovered"] == 0.7
