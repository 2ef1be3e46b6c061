"""Students and teachers from timm with tiny overrides; teacher weights round trip through export."""

from pathlib import Path

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
    with pytest.raises(InputError, match=r"--img-size applies only to ViT/DeiT models, not 'regnetx_002' "
                                         r"\(convnets take any input size >= 32 without a size setting\)"):
        create_student(REGNET, C, img_size=32)
    with pytest.raises(InputError, match="--patch-size"):
        create_student(REGNET, C, patch_size=4)
    with pytest.raises(InputError, match="RegNet has no distillation token; use a"):
        set_distilled_training(model, True)
    with pytest.raises(InputError, match="unknown timm model"):
        create_student("no_such_model", C)


def test_student_gets_every_override_deits_drop_path_and_its_input_channels():
    """Each ViT override reaches timm; stochastic depth defaults to DeiT's 0.1, which timm's ViT spreads
    linearly over the blocks (depth 2: 0 then 0.1); in_chans=1 gives a student of grayscale views."""
    model = create_student(DEIT, C, **TINY_VIT)
    assert (model.embed_dim, model.blocks[0].attn.num_heads) == (48, 3)
    assert model.patch_embed.proj.kernel_size == (4, 4) and model.patch_embed.proj.in_channels == 3
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    gray = create_student(DEIT, C, drop_path_rate=0.3, in_chans=1, **TINY_VIT)
    assert gray.blocks[1].drop_path1.drop_prob == pytest.approx(0.3)
    assert gray.patch_embed.proj.in_channels == 1 and gray.eval()(torch.randn(2, 1, 32, 32)).shape == (2, C)


@pytest.mark.parametrize("size", [32, 64])
def test_small_regnet_teacher_takes_small_images(size):
    teacher, digest = create_teacher(REGNET, C, weights=None, img_size=size)
    assert digest == "none" and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen: no gradients, no optimizer state
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
    path = str(tmp_path / "tiny_deit.safetensors")
    export_safetensors(timm.create_model(DEIT, pretrained=False, num_classes=C, **TINY_VIT), path)
    with pytest.raises(InputError) as info:
        create_teacher(DEIT, C, path, img_size=32)
    # torch's first two lines as one, cut to 300 characters and " ..." (the missing keys fill thousands).
    detail = str(info.value).split(f"do not fit {DEIT}: ", 1)[1]
    assert detail.startswith("Error(s) in loading state_dict for VisionTransformerDistilled: "
                             'Missing key(s) in state_dict: "blocks.2.norm1.weight", ')
    assert len(detail) == 300 + len(" ...") and detail.endswith(" ...")
    with pytest.raises(InputError, match="not found"):
        create_teacher(REGNET, C, str(tmp_path / "missing.safetensors"))


def test_teacher_refusals_name_the_classifier_or_the_missing_key(tmp_path):
    """A distilled DeiT has two classifiers (head, head_dist) and each must have the data set's classes;
    a classifier missing from the weights is a missing key like any other, reported with torch's first
    two lines (the missing keys) and nothing after them (the unexpected ones)."""
    path = str(tmp_path / "teacher.safetensors")
    safetensors.torch.save_file({"head.weight": torch.zeros(C, 192), "head_dist.weight": torch.zeros(7, 192)}, path)
    with pytest.raises(InputError, match=rf"have 7 classes \(head_dist\), the data set has {C}$"):
        create_teacher(DEIT, C, path, img_size=32)
    state = timm.create_model(REGNET, pretrained=False, num_classes=C).state_dict()
    state["head.fc.kernel"] = state.pop("head.fc.weight")
    safetensors.torch.save_file(state, path)
    with pytest.raises(InputError) as info:
        create_teacher(REGNET, C, path)
    assert str(info.value) == (f"teacher weights {path} do not fit {REGNET}: Error(s) in loading state_dict for "
                               'RegNet: Missing key(s) in state_dict: "head.fc.weight".')


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


class _Payload:
    ran = None  # where the payload would write, if a load ever ran it

    def __reduce__(self):
        return (open, (_Payload.ran, "w"))


def test_pickled_objects_are_not_loaded_and_the_unsafe_load_is_never_advised(tmp_path, recwarn):
    """A malicious .pth, a state dict holding another object, a bare pickle: refused without running anything,
    with no advice to load weights_only=False and no pickle-protocol warning; a text file is not a checkpoint."""
    import pickle

    _Payload.ran = str(tmp_path / "payload-ran")
    files = {"malicious.pth": pickle.dumps({"model": _Payload()}), "bare.pth": pickle.dumps({"w": [1, 2]}),
             "text.pth": b"hello world\n"}
    torch.save({"model": {"x": _NotAWeight()}}, str(tmp_path / "object.pth"))
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=r"^cannot read weights .*object\.pth: it holds Python objects other than "
                                         r"tensors, which a weights-only load refuses to run; save a state dict"):
        read_weights(str(tmp_path / "object.pth"))
    for name in ("malicious.pth", "bare.pth"):  # pickled with protocol 4, which torch's weights-only reader lacks
        with pytest.raises(InputError, match=r"^cannot read weights .*: not a checkpoint a weights-only load can "
                                             r"read \(Unsupported operand \d+\); save a state dict") as info:
            read_weights(str(tmp_path / name))
        assert "weights_only" not in str(info.value)
    with pytest.raises(InputError, match=r"^cannot read weights .*text\.pth: not a torch checkpoint \(KeyError"):
        read_weights(str(tmp_path / "text.pth"))
    assert not Path(_Payload.ran).exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_an_fp32_teacher_runs_without_tf32_and_bf16_under_autocast():
    """A GPU runs fp32 convolutions and matmuls in TF32 unless told not to: an fp32 teacher turns it off for its
    scope (and puts the process's choice back after); bf16 is autocast."""
    from deit_pipe.models.precision import device_kind, inference_precision

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with inference_precision(torch.device("cpu"), "fp32"):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert not torch.is_autocast_enabled("cpu")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    with inference_precision(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert device_kind(torch.device("cpu")) == "cpu"
