"""Students and teachers from timm with tiny overrides; teacher weights round trip through export."""

import pytest
import safetensors.torch
import timm
import torch

from deit_pipe.errors import InputError
from deit_pipe.models.export import export_safetensors, read_weights
from deit_pipe.models.registry import (
    create_student,
    create_teacher,
    eval_logits,
    head_logits,
    is_distilled,
    set_distilled_training,
)

C = 10
DEIT = "deit_tiny_distilled_patch16_224"
TINY_VIT = dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=3)
REGNET = "regnetx_002"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32)


def test_distilled_student_heads(images):
    model = create_student(DEIT, C, **TINY_VIT)
    assert is_distilled(model) and model.patch_embed.img_size == (32, 32) and len(model.blocks) == 2
    set_distilled_training(model, True)
    model.train()
    cls_logits, dist_logits = model(images)
    assert cls_logits.shape == dist_logits.shape == (2, C)
    model.eval()
    with torch.no_grad():
        heads = head_logits(model, images)
        torch.testing.assert_close(heads["avg"], model(images))  # timm's eval output: the heads' average
        torch.testing.assert_close(heads["avg"], (heads["cls"] + heads["dist"]) / 2)
        set_distilled_training(model, False)
        torch.testing.assert_close(eval_logits(model, images), heads["avg"])


def test_convnet_student_refuses_vit_overrides(images):
    model = create_student(REGNET, C)
    assert not is_distilled(model) and set(head_logits(model.eval(), images)) == {"avg"}
    with pytest.raises(InputError, match="--img-size"):
        create_student(REGNET, C, img_size=32)
    with pytest.raises(InputError, match="--patch-size"):
        create_student(REGNET, C, patch_size=4)
    with pytest.raises(InputError, match="no distillation token"):
        set_distilled_training(model, True)
    with pytest.raises(InputError, match="unknown timm model"):
        create_student("no_such_model", C)


@pytest.mark.parametrize("size", [32, 64])
def test_small_regnet_teacher_takes_small_images(size):
    teacher, digest = create_teacher(REGNET, C, weights=None, img_size=size)
    assert digest == "none" and not teacher.training
    with torch.no_grad():
        assert teacher(torch.randn(2, 3, size, size)).shape == (2, C)


@pytest.mark.parametrize("name,overrides,suffix", [
    (REGNET, {}, ".safetensors"),
    (DEIT, dict(img_size=32), ".safetensors"),  # a ViT teacher takes only img_size
    (REGNET, {}, ".pth"),
])
def test_teacher_weights_round_trip(tmp_path, images, name, overrides, suffix):
    source = timm.create_model(name, pretrained=False, num_classes=C, **overrides).eval()
    path = str(tmp_path / f"teacher{suffix}")
    if suffix == ".safetensors":
        digest = export_safetensors(source, path)
    else:  # DeiT's own checkpoint layout
        torch.save({"model": source.state_dict(), "epoch": 3}, path)
        digest = read_weights(path)[2]
    teacher, teacher_digest = create_teacher(name, C, path, img_size=overrides.get("img_size"))
    assert teacher_digest == digest
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), source(images))


def test_exported_weights_load_in_plain_timm(tmp_path, images):
    source = timm.create_model(DEIT, pretrained=False, num_classes=C, **TINY_VIT).eval()
    path = str(tmp_path / "deit.safetensors")
    export_safetensors(source, path)
    assert read_weights(path)[1] == {"model": DEIT}

    plain = timm.create_model(DEIT, pretrained=False, num_classes=C, **TINY_VIT).eval()
    plain.load_state_dict(safetensors.torch.load_file(path))
    # timm's own pretrained path, offline. num_classes must go into the overlay too: timm drops the
    # classifier weights (non-strict load) when num_classes differs from the pretrained cfg's 1000.
    via_cfg = timm.create_model(
        DEIT, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=C), num_classes=C, **TINY_VIT
    ).eval()
    with torch.no_grad():
        want = source(images)
        torch.testing.assert_close(plain(images), want)
        torch.testing.assert_close(via_cfg(images), want)


def test_teacher_refuses_mismatched_weights(tmp_path):
    path = str(tmp_path / "teacher.safetensors")
    export_safetensors(timm.create_model(REGNET, pretrained=False, num_classes=C), path)
    with pytest.raises(InputError, match=f"have {C} classes.*data set has 7"):
        create_teacher(REGNET, 7, path)
    with pytest.raises(InputError, match="regnetx_002, not regnety_002"):
        create_teacher("regnety_002", C, path)
    with pytest.raises(InputError, match=r"do not fit deit_tiny_distilled_patch16_224: .*Missing key\(s\)"):
        path = str(tmp_path / "tiny_deit.safetensors")
        export_safetensors(timm.create_model(DEIT, pretrained=False, num_classes=C, **TINY_VIT), path)
        create_teacher(DEIT, C, path, img_size=32)
    with pytest.raises(InputError, match="not found"):
        create_teacher(REGNET, C, str(tmp_path / "missing.safetensors"))


def test_teacher_weights_from_fsspec_url(images):
    source = timm.create_model(REGNET, pretrained=False, num_classes=C).eval()
    url = "memory://deit-pipe-test/teacher.safetensors"
    digest = export_safetensors(source, url)
    teacher, teacher_digest = create_teacher(REGNET, C, url)
    assert teacher_digest == digest
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), source(images))


class _NotAWeight:
    pass


def test_pickled_objects_are_not_loaded(tmp_path):
    path = str(tmp_path / "unsafe.pth")
    torch.save({"model": {"x": _NotAWeight()}}, path)
    with pytest.raises(InputError, match="cannot read weights"):
        read_weights(path)
