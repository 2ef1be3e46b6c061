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

import timm
from timm.models import is_model_in_modules, split_model_name_tag
from torch import Tensor, nn

from deit_pipe.errors import InputError
from deit_pipe.models.export import MODEL_NAME_KEY, read_weights

# timm modules whose constructors take img_size, patch_size, depth, embed_dim, num_heads.
VIT_MODULES = ("vision_transformer", "deit")
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


def create_teacher(
    name: str, num_classes: int, weights: str | None, img_size: int | None = None
) -> tuple[nn.Module, str]:
    """(timm model in eval mode, sha256 of its weights file or "none" for random weights).

    `img_size` is passed to ViT/DeiT teachers and ignored by convnets, which take any size >= 32."""
    overrides = {"img_size": img_size} if is_vit(name) and img_size is not None else {}
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **overrides)
    digest = NO_WEIGHTS
    if weights is not None:
        state_dict, metadata, digest = read_weights(weights)
        arch = split_model_name_tag(name)[0]
        if metadata.get(MODEL_NAME_KEY, arch) != arch:
            raise InputError(f"teacher weights {weights} are for {metadata[MODEL_NAME_KEY]}, not {arch}")
        for classifier, (have, want) in _classifier_sizes(model, state_dict).items():
            if have != want:
                raise InputError(
                    f"teacher weights {weights} have {have} classes ({classifier}), the data set has {want}"
                )
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:  # missing/unexpected keys or shapes: the first two lines say which
            detail = " ".join(line.strip() for line in str(exc).splitlines()[:2])
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            raise InputError(f"teacher weights {weights} do not fit {name}: {detail}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, digest
