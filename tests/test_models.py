"""Students and teachers from timm with tiny overrides; teacher weights round trip through export."""

import json
import subprocess
import sys
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
    # The architecture and the constructor arguments, so that `eval` and `--init` rebuild exactly this model.
    # One metadata key (safetensors orders several differently from run to run): the export's bytes repeat.
    assert read_weights(path)[1] == {"model": json.dumps({"args": {**TINY_VIT, "num_classes": C}, "name": DEIT},
                                                         sort_keys=True)}
    script = ("import sys, timm, torch; from deit_pipe.models.export import export_safetensors; torch.manual_seed(0); "
              f"export_safetensors(timm.create_model({DEIT!r}, num_classes={C}, **{TINY_VIT!r}), sys.argv[1])")
    for copy in ("a.safetensors", "b.safetensors"):  # two processes: safetensors' key order changes per process
        subprocess.run([sys.executable, "-c", script, str(tmp_path / copy)], check=True)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()

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
    export_safetensors(timm.create_model(DEIT, pretrained=False, num_classes=C, **{**TINY_VIT, "patch_size": 16}),
                       path)
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


def test_init_resamples_position_embeddings_as_deit_fine_tunes(tmp_path):
    """DeiT-Ti distilled 224 -> 384: the position grid 14x14 -> 24x24 as DeiT's main.py --finetune computes it
    (written out here: plain bicubic, align_corners=False, the two prefix tokens kept), which is timm's resampler
    without antialias; every other tensor as timm's own pretrained path (a local file) loads it."""
    import torch.nn.functional as F
    from timm.layers import resample_abs_pos_embed

    from deit_pipe.models.registry import load_weights

    source = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    path = str(tmp_path / "deit224.safetensors")
    export_safetensors(source, path)
    ours = create_student("deit_tiny_distilled_patch16_224", 1000, img_size=384)
    loaded = load_weights(ours, path, "--init weights", fresh_heads=True, resample=True)
    assert loaded.pos_grid == ((14, 14), (24, 24)) and loaded.fresh_heads == ()

    old = source.pos_embed.detach()
    grid = old[:, 2:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    deit = torch.cat([old[:, :2], grid.reshape(1, 576, 192)], dim=1)
    torch.testing.assert_close(ours.pos_embed.detach(), deit, rtol=0, atol=0)
    torch.testing.assert_close(ours.pos_embed.detach(),
                               resample_abs_pos_embed(old, (24, 24), num_prefix_tokens=2, antialias=False),
                               rtol=0, atol=0)
    via_timm = timm.create_model("deit_tiny_distilled_patch16_224", img_size=384, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=path)).state_dict()
    for key, value in ours.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(value, via_timm[key], rtol=0, atol=0, msg=key)
    # timm's pretrained path antialiases (PIL's bicubic kernel): the one tensor where DeiT and timm part.
    assert not torch.equal(via_timm["pos_embed"], deit)


def test_init_with_another_class_count_gets_fresh_heads_and_names_them(tmp_path, images):
    from deit_pipe.models.registry import load_weights, student_from_weights

    source = create_student(DEIT, C, **TINY_VIT)
    path = str(tmp_path / "ten.safetensors")
    export_safetensors(source, path)
    torch.manual_seed(1)
    five = create_student(DEIT, 5, **TINY_VIT)
    fresh = {k: v.clone() for k, v in five.state_dict().items() if k.startswith("head")}
    loaded = load_weights(five, path, "--init weights", fresh_heads=True)
    assert loaded.fresh_heads == ("head", "head_dist") and loaded.pos_grid is None
    assert loaded.notes(path, 5) == [f"--init {path}: new head and head_dist for 5 classes"]
    # --new-head: fresh classifiers for as many classes too (a transfer to other classes).
    same = create_student(DEIT, C, **TINY_VIT)
    before = same.head.weight.detach().clone()
    assert load_weights(same, path, "--init weights", fresh_heads=True, new_heads=True).fresh_heads == (
        "head", "head_dist")
    assert torch.equal(same.head.weight, before) and torch.equal(same.blocks[0].attn.qkv.weight,
                                                                  source.blocks[0].attn.qkv.weight)
    assert load_weights(same, path, "--init weights", fresh_heads=True).fresh_heads == ()
    assert torch.equal(same.head.weight, source.head.weight)
    state = five.state_dict()
    for key, value in source.state_dict().items():
        want = fresh[key] if key.startswith("head") else value
        torch.testing.assert_close(state[key], want, rtol=0, atol=0, msg=key)
    # The export rebuilds itself from its metadata alone, at another size too.
    rebuilt, _ = student_from_weights(path, C)
    assert (rebuilt.patch_embed.img_size, len(rebuilt.blocks), rebuilt.embed_dim) == ((32, 32), 2, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(images), source.eval()(images))
    bigger, loaded = student_from_weights(path, C, img_size=48)
    assert bigger.patch_embed.grid_size == (12, 12) and loaded.pos_grid == ((8, 8), (12, 12))


def test_bad_init_weights_are_refused_in_one_line(tmp_path):
    from deit_pipe.models.registry import load_weights, student_from_weights

    path = str(tmp_path / "regnet.safetensors")
    export_safetensors(timm.create_model(REGNET, pretrained=False, num_classes=C), path)
    with pytest.raises(InputError, match=rf"^--init weights {path} are for regnetx_002, not {DEIT}$"):
        load_weights(create_student(DEIT, C, **TINY_VIT), path, "--init weights", fresh_heads=True)
    torch.save(timm.create_model(REGNET, pretrained=False, num_classes=C).state_dict(), tmp_path / "regnet.pth")
    with pytest.raises(InputError, match=rf"^--init weights .*regnet\.pth do not fit {DEIT}: Error"):
        load_weights(create_student(DEIT, C, **TINY_VIT), str(tmp_path / "regnet.pth"), "--init weights",
                     fresh_heads=True)
    # Another patch size is refused (DeiT's load fails; timm's filter would resample the kernel), and so is
    # another grid where nothing asks for a resample (a teacher's weights).
    tiny = str(tmp_path / "tiny.safetensors")
    export_safetensors(create_student(DEIT, C, **TINY_VIT), tiny)
    with pytest.raises(InputError, match=r"have patch size 4, the model 8: pass --patch-size 4$"):
        load_weights(create_student(DEIT, C, **{**TINY_VIT, "patch_size": 8}), tiny, "--init weights", resample=True)
    with pytest.raises(InputError, match=r"^teacher weights .* are for another image size \(position embeddings "
                                         r"\(1, 66, 48\), the model's \(1, 146, 48\)\)$"):
        load_weights(create_student(DEIT, C, **{**TINY_VIT, "img_size": 48}), tiny, "teacher weights")
    with pytest.raises(InputError, match=r"does not name its architecture \(not a deit-pipe export\): pass --model"):
        student_from_weights(str(tmp_path / "regnet.pth"), C)
    with pytest.raises(InputError, match="weights file not found"):
        student_from_weights(str(tmp_path / "missing.safetensors"), C)


def test_a_convnet_teacher_runs_channels_last_on_a_gpu_and_as_it_was_on_a_cpu(monkeypatch, images):
    """cuDNN's NHWC kernels for a convnet teacher on a GPU (the input follows the weights' layout); a ViT, and
    any teacher on a CPU, keep their layout, so CPU-made stores stay what they were. Without a GPU here, the
    GPU cases are checked as the placement teacher_on asks for, not as kernels that ran."""
    from deit_pipe.models.precision import teacher_on

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    calls = []
    for name, overrides in ((REGNET, {}), (DEIT, {"img_size": 32})):
        model = create_teacher(name, C, None, **overrides)[0]
        monkeypatch.setattr(model, "to", lambda *args, name=name, model=model, **kw: calls.append((name, args, kw))
                            or model)
        teacher_on(model, cuda)
        teacher_on(model, cpu)
    assert calls == [(REGNET, (cuda,), {"memory_format": torch.channels_last}),
                     (REGNET, (cpu,), {"memory_format": torch.preserve_format}),
                     (DEIT, (cuda,), {"memory_format": torch.preserve_format}),
                     (DEIT, (cpu,), {"memory_format": torch.preserve_format})]
    model = create_teacher(REGNET, C, None)[0]
    placed = teacher_on(model, cpu)
    assert all(p.is_contiguous() for p in placed.parameters())
