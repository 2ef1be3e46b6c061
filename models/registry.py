"""Student and teacher models from timm, never downloading weights.

Students: any timm model, built with pretrained=False. The architecture overrides (img_size, patch_size,
depth, embed_dim, num_heads) exist only in the ViT/DeiT constructors, so they are passed only when given
and refused for other families.

Teachers: any timm model in eval mode, weights only from a local file or fsspec URL. DeiT's teacher is
RegNetY-16GF (`regnety_160`); for tiny data sets the small RegNets (`regnetx_002`, `regnety_002`, ...)
make cheap teachers. They are convnets with global average pooling, so they need no size setting: any
input of at least 32 px (their total stride) works, e.g. 32x32 Fashion-MNIST views.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
from timm.models import is_model_in_modules, split_model_name_tag
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter
from torch import Tensor, nn

from deit_pipe.errors import InputError
from deit_pipe.models.export import VIT_MODULES, exported_model, read_weights

NO_WEIGHTS = "none"  # the weights digest of a randomly initialised teacher


def is_vit(name: str) -> bool:
    if not timm.is_model(name):
        raise InputError(f"unknown timm model {name!r}")
    return is_model_in_modules(name, VIT_MODULES)


def _architecture_overrides(name: str, **given: int | None) -> dict[str, int]:
    """The overrides that were given, refused (naming the flag) for a model that is not a ViT/DeiT."""
    overrides = {k: v for k, v in given.items() if v is not None}
    if not is_vit(name) and overrides:
        flag = "--" + next(iter(overrides)).replace("_", "-")
        raise InputError(
            f"{flag} applies only to ViT/DeiT models, not {name!r} "
            "(convnets take any input size >= 32 without a size setting)"
        )
    return overrides


def create_student(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    patch_size: int | None = None,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    drop_path_rate: float = 0.1,
    in_chans: int = 3,
) -> nn.Module:
    """A freshly initialised timm model (pretrained=False); overrides apply to ViT/DeiT only."""
    overrides = _architecture_overrides(
        name, img_size=img_size, patch_size=patch_size, depth=depth, embed_dim=embed_dim, num_heads=num_heads
    )
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate, in_chans=in_chans,
        **overrides,
    )


def is_distilled(model: nn.Module) -> bool:
    """Whether the model has a distillation token and head (timm's distilled DeiT)."""
    return hasattr(model, "set_distilled_training")


def set_distilled_training(model: nn.Module, flag: bool) -> None:
    """In distilled training mode (and model.train()) a distilled DeiT returns (cls_logits, dist_logits)."""
    if is_distilled(model):
        model.set_distilled_training(flag)
    elif flag:
        raise InputError(f"{type(model).__name__} has no distillation token; use a *_distilled_* DeiT")


def head_logits(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """{"avg", "cls", "dist"} for a distilled DeiT ("avg" is its eval output), else {"avg"}.

    Runs in the model's current mode (call model.eval() for evaluation)."""
    if not is_distilled(model):
        return {"avg": model(x)}
    tokens = model.forward_features(x)
    cls = model.head(model.head_drop(tokens[:, 0]))
    dist = model.head_dist(model.head_drop(tokens[:, 1]))
    return {"avg": (cls + dist) / 2, "cls": cls, "dist": dist}


def eval_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The logits evaluation scores: the two heads' average for a distilled DeiT, in any training mode."""
    return head_logits(model, x)["avg"]


def _classifier_sizes(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, tuple[int, int]]:
    """{classifier: (classes in the weights, classes in the model)} for each classifier in both."""
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    model_state = model.state_dict()
    return {
        c: (state_dict[f"{c}.weight"].shape[0], model_state[f"{c}.weight"].shape[0])
        for c in classifiers
        if f"{c}.weight" in state_dict and f"{c}.weight" in model_state
    }


@dataclass(frozen=True)
class LoadedWeights:
    """What loading a weights file into a model did."""

    sha256: str
    fresh_heads: tuple[str, ...] = ()  # classifiers kept as the model initialised them
    pos_grid: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (weights', model's) grid when resampled

    def notes(self, url: str, classes: int) -> list[str]:
        """What a user should hear about the load (nothing when the weights fit as they are)."""
        lines = []
        if self.pos_grid:
            old, new = ("x".join(map(str, g)) for g in self.pos_grid)
            lines.append(f"--init {url}: position embeddings resampled from a {old} to a {new} patch grid (timm)")
        if self.fresh_heads:
            lines.append(f"--init {url}: new {' and '.join(self.fresh_heads)} for {classes} classes")
        return lines


def check_architecture(metadata: dict[str, str], name: str, url: str, role: str) -> str:
    """`name`'s architecture, refused when a deit-pipe export names another one."""
    arch = split_model_name_tag(name)[0]
    named = exported_model(metadata)[0]
    if named not in (None, arch):
        raise InputError(f"{role} {url} are for {named}, not {arch}")
    return arch


def load_weights(model: nn.Module, url: str, role: str, fresh_heads: bool = False, new_heads: bool = False,
                 resample: bool = False,
                 read: tuple[dict[str, Tensor], dict[str, str], str] | None = None) -> LoadedWeights:
    """Load the weights file at `url` (weights-only, local or fsspec URL) into `model`, which keeps its size.

    With `resample`, a ViT/DeiT goes through timm's own checkpoint filter, which resamples the position
    embeddings to the model's patch grid as DeiT's fine-tuning does (bicubic, align_corners=False, the class and
    distillation tokens kept); without, another grid is refused. Another patch size is always refused (DeiT's
    load fails on it; timm's filter would resample the patch kernel). A classifier whose class count differs is
    refused, or with `fresh_heads` kept as the model initialised it (DeiT's fine-tuning: both heads of a
    distilled model); `new_heads` keeps them so whatever the class count (a transfer to other classes).
    Anything else that does not fit is refused in one line, naming `role` ("teacher weights", "--init
    weights"). `read`: the file's `read_weights(url)` when the caller has it already."""
    state_dict, metadata, digest = read or read_weights(url)
    state_dict = dict(state_dict)  # the caller's copy keeps its tensors
    arch = check_architecture(metadata, model.pretrained_cfg["architecture"], url, role)
    grid = None
    if is_vit(arch) and state_dict.get("pos_embed") is not None:
        kernel = state_dict.get("patch_embed.proj.weight")
        if kernel is not None and kernel.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            raise InputError(f"{role} {url} have patch size {kernel.shape[-1]}, the model "
                             f"{model.patch_embed.proj.weight.shape[-1]}: pass --patch-size {kernel.shape[-1]}")
        before = state_dict["pos_embed"].shape
        if before[1] != model.pos_embed.shape[1] and not resample:
            raise InputError(f"{role} {url} are for another image size (position embeddings {tuple(before)}, the "
                             f"model's {tuple(model.pos_embed.shape)})")
        # antialias off: DeiT's main.py resamples with plain bicubic interpolation (timm's default antialias
        # takes PIL's bicubic kernel, other values).
        state_dict = vit_checkpoint_filter(state_dict, model, antialias=False)
        if state_dict["pos_embed"].shape != before:
            prefix = model.num_prefix_tokens
            old = int(round((before[1] - prefix) ** 0.5))
            grid = ((old, old), tuple(model.patch_embed.grid_size))
    fresh = []
    own = model.state_dict()
    for classifier, (have, want) in _classifier_sizes(model, state_dict).items():
        if have != want and not fresh_heads:
            raise InputError(f"{role} {url} have {have} classes ({classifier}), the data set has {want}")
        if have != want or new_heads:
            fresh.append(classifier)
            for key in (f"{classifier}.weight", f"{classifier}.bias"):
                state_dict[key] = own[key]
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: the first two lines say which
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:2])
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise InputError(f"{role} {url} do not fit {arch}: {detail}") from None
    return LoadedWeights(digest, tuple(fresh), grid)


def architecture_args(metadata: dict[str, str]) -> dict[str, int]:
    """The ViT/DeiT constructor overrides a deit-pipe export was built with (none for other files)."""
    args = dict(exported_model(metadata)[1])
    args.pop("num_classes", None)
    return args


def student_from_weights(url: str, num_classes: int, name: str | None = None,
                         img_size: int | None = None) -> tuple[nn.Module, LoadedWeights]:
    """The model a weights file holds, rebuilt (architecture and overrides from a deit-pipe export's metadata, or
    `name` for a timm checkpoint) and loaded; a ViT/DeiT at `img_size` when given (position embeddings
    resampled), a convnet as it is (it takes any size)."""
    read = read_weights(url)
    named = exported_model(read[1])[0]
    name = name or named
    if name is None:
        raise InputError(f"{url} does not name its architecture (not a deit-pipe export): pass --model")
    args = architecture_args(read[1]) if named in (None, name) else {}
    if img_size is not None and is_vit(name):
        args["img_size"] = img_size
    model = create_student(name, num_classes, drop_path_rate=0.0, **args)
    return model, load_weights(model, url, "weights", resample=True, read=read)


def create_teacher(
    name: str, num_classes: int, weights: str | None, img_size: int | None = None
) -> tuple[nn.Module, str]:
    """(timm model in eval mode, sha256 of its weights file or "none" for random weights).

    `img_size` is passed to ViT/DeiT teachers and ignored by convnets, which take any size >= 32."""
    overrides = {"img_size": img_size} if is_vit(name) and img_size is not None else {}
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **overrides)
    digest = NO_WEIGHTS if weights is None else load_weights(model, weights, "teacher weights").sha256
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, digest
