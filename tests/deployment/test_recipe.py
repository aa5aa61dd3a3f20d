"""The deploy recipe: TOML round trip, the pipeline it runs, glob-safe layer names, bad recipes refused."""
from __future__ import annotations

import fnmatch

import pytest

from tensorfold.deployment.recipe import LayerChoice, Recipe
from tensorfold.ir.errors import TensorfoldError
from tensorfold.passes.pipeline import parse


def _recipe() -> Recipe:
    return Recipe([LayerChoice("layer1.0.conv1", "tucker2", (16, 8)), LayerChoice("fc", "svd", (32,)),
                   LayerChoice("conv[2]*", "svd", (8,)), LayerChoice("layer1.0.conv2", "original")],
                  int8=True, finetune_epochs=2, finetune_lr=3e-4, notes={"target": "x86"})


def test_toml_round_trip_keeps_every_choice():
    recipe = _recipe()
    again = Recipe.from_toml(recipe.to_toml())
    assert again.layers == recipe.layers and again.int8 and again.finetune_epochs == 2
    assert again.finetune_lr == 3e-4
    assert again.steps() == recipe.steps()


def test_the_pipeline_text_parses_to_the_steps_it_runs():
    recipe = _recipe()
    steps = recipe.steps()
    assert steps[0] == ("fold_bn", {})
    assert [name for name, _ in steps] == ["fold_bn", "tucker2", "svd", "svd"]  # the original layer: no step
    parsed = parse(recipe.pipeline_text())
    assert [(name, options["rank"] if "rank" in options else None) for name, options in parsed][1] == \
        ("tucker2", "(16,8)")


def test_include_patterns_match_exactly_their_layer():
    pattern = _recipe().steps()[3][1]["include"]
    assert fnmatch.fnmatchcase("conv[2]*", pattern)
    assert not fnmatch.fnmatchcase("conv2x", pattern) and not fnmatch.fnmatchcase("conv[2]", pattern)


@pytest.mark.parametrize("text", ['format = "other"', 'format = "tensorfold-deploy-recipe/1"\n[[layers]]\n'
                                  'name = "fc"\nmethod = "cp"\nranks = [4]', "not = toml =",
                                  'format = "tensorfold-deploy-recipe/1"\nfinetune_lr = -0.1'])
def test_bad_recipes_are_refused(text):
    with pytest.raises(TensorfoldError):
        Recipe.from_toml(text)


def test_a_recipe_written_before_finetune_lr_repeats_the_rate_it_was_fine_tuned_at():
    old = Recipe.from_toml('format = "tensorfold-deploy-recipe/1"\nfinetune_epochs = 2\n')
    assert old.finetune_lr == 1e-3 and Recipe([]).finetune_lr == 1e-4  # deploy's default since then
