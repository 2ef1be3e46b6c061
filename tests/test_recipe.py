"""The view recipe's overrides (`--recipe`) and the refusal of ones that contradict a store's recipe."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor
from torchvision import transforms

from deit_pipe.data.recipe import TabulatedNormalize, ViewRecipe
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


def _normalised(pixels: np.ndarray, recipe: ViewRecipe) -> torch.Tensor:
    """HWC uint8 -> CHW float, (x / 255 - mean) / std: the recipe's normalisation written out."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(recipe.mean)[:, None, None]) / torch.tensor(recipe.std)[:, None, None]


def test_small_images_are_cropped_with_padding_and_never_resized():
    """DeiT's build_transform for input_size <= 32: RandomCrop(size, padding=4) replaces the random resized
    crop; evaluation does not resize (here a 28 px image is only padded to 32, centred)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    recipe = ViewRecipe(img_size=32, auto_augment=None, hflip=0.0, reprob=0.0, color_jitter=0.0)
    padded = np.pad(pixels, ((4, 4), (4, 4), (0, 0)))  # 36 x 36, black border
    crops = [_normalised(padded[i : i + 32, j : j + 32], recipe) for i in range(5) for j in range(5)]
    transform = recipe.train_transform()
    offsets = set()
    for seed in range(12):
        torch.manual_seed(seed)
        view = transform(Image.fromarray(pixels))
        matches = [k for k, crop in enumerate(crops) if torch.allclose(view, crop, atol=1e-6)]
        assert len(matches) == 1, "the view is not an unscaled crop of the padded image"
        offsets.add(matches[0])
    assert len(offsets) > 3  # the crop moves
    centred = _normalised(np.pad(pixels, ((2, 2), (2, 2), (0, 0))), recipe)
    assert torch.allclose(recipe.eval_transform()(Image.fromarray(pixels)), centred, atol=1e-6)


def test_larger_images_keep_the_random_resized_crop_and_the_0875_resize():
    recipe = ViewRecipe(img_size=48)
    assert type(recipe.train_transform().transforms[0]).__name__ == "RandomResizedCropAndInterpolation"
    resize = recipe.eval_transform().transforms[0]
    assert resize.size == int(48 / 0.875)  # DeiT: Resize(int(input_size / 0.875)), then the centre crop


def _timm_transform(recipe: ViewRecipe, training: bool):
    """timm's create_transform with the recipe's arguments, as DeiT's build_transform calls it."""
    if training:
        return create_transform(input_size=recipe.img_size, is_training=True, scale=recipe.scale,
                                ratio=recipe.ratio, hflip=recipe.hflip, color_jitter=recipe.color_jitter,
                                auto_augment=recipe.auto_augment, interpolation=recipe.interpolation,
                                mean=recipe.mean, std=recipe.std, re_prob=recipe.reprob, re_mode=recipe.remode,
                                re_count=recipe.recount)
    return create_transform(input_size=recipe.img_size, is_training=False, interpolation=recipe.interpolation,
                            mean=recipe.mean, std=recipe.std)


RECIPES = [ViewRecipe(), ViewRecipe(img_size=48, mean=(0.1, 0.7, 0.3), std=(0.9, 0.2, 0.5))]


@pytest.mark.parametrize("recipe", RECIPES, ids=["deit", "other-normalisation"])
def test_transforms_give_timms_own_bits(recipe):
    """The recipe's train and eval transforms (their to-tensor and Normalize read from a table) give exactly the
    tensors timm's create_transform gives under the same draws."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)) for _ in range(4)]
    for training in (True, False):
        ours = recipe.train_transform() if training else recipe.eval_transform()
        theirs = _timm_transform(recipe, training)
        for seed, image in enumerate(images):
            outputs = []
            for transform in (ours, theirs):
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
                outputs.append(transform(image))
            assert torch.equal(*outputs), (training, seed)


@pytest.mark.parametrize("recipe", RECIPES, ids=["deit", "other-normalisation"])
@pytest.mark.parametrize("size", [(224, 224), (17, 19)])  # an odd size: the kernels' scalar tails too
def test_table_is_timms_to_tensor_and_normalize_for_every_byte(recipe, size):
    """The table step against timm's MaybeToTensor then Normalize (built here) on images whose every channel holds
    every byte value; an image that is not RGB is refused."""
    table = next(t for t in recipe.eval_transform().transforms if isinstance(t, TabulatedNormalize))
    timm_pair = transforms.Compose([MaybeToTensor(), transforms.Normalize(torch.tensor(recipe.mean),
                                                                          torch.tensor(recipe.std))])
    rng = np.random.default_rng(size[0])
    pixels = np.stack([rng.permutation(np.resize(np.arange(256, dtype=np.uint8), size[0] * size[1])).reshape(size)
                       for _ in range(3)], axis=2)
    assert all(len(np.unique(pixels[..., c])) == 256 for c in range(3))
    image = Image.fromarray(pixels)
    assert torch.equal(table(image), timm_pair(image))
    with pytest.raises(ValueError, match="RGB"):
        table(image.convert("L"))
