"""The view recipe's overrides (`--recipe`) and the refusal of ones that contradict a store's recipe."""

import pytest

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.errors import InputError
from deit_pipe.pipeline.cli import recipe_overrides


def test_overrides_change_only_the_named_fields():
    base = ViewRecipe(img_size=32)
    light = base.with_overrides({"auto_augment": None, "scale": [0.5, 1]})
    assert light.auto_augment is None and light.scale == (0.5, 1.0)
    assert light.img_size == 32 and light.mixup_alpha == base.mixup_alpha
    assert light.hash() != base.hash()
    assert base.with_overrides({}).hash() == base.hash()


def test_unknown_field_is_refused():
    with pytest.raises(InputError, match="bogus"):
        ViewRecipe().with_overrides({"bogus": 1})


def test_conflict_names_the_field():
    store_recipe = ViewRecipe(img_size=32, reprob=0.25)
    store_recipe.refuse_conflicts({"img_size": 32}, "--recipe", "the store's recipe")  # same value: fine
    with pytest.raises(InputError, match=r"reprob is 0.25 there but 0 here"):
        store_recipe.refuse_conflicts({"reprob": 0}, "--recipe", "the store's recipe")


def test_recipe_option_takes_inline_json_or_a_file(tmp_path):
    assert recipe_overrides('{"reprob": 0}') == {"reprob": 0}
    path = tmp_path / "recipe.json"
    path.write_text('{"mixup_alpha": 0.2}')
    assert recipe_overrides(str(path)) == {"mixup_alpha": 0.2}
    assert recipe_overrides(None) == {}
    with pytest.raises(InputError, match="not valid JSON"):
        recipe_overrides("{oops")
    with pytest.raises(InputError, match="JSON object"):
        path.write_text("[1, 2]")
        recipe_overrides(str(path))
