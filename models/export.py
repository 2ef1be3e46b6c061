"""Model weights as files: export to safetensors, read back from a local path or fsspec URL.

Reading never unpickles arbitrary objects: .safetensors via safetensors, anything else (.pth, .pt)
via torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import struct
import warnings

import safetensors.torch
import torch
from timm.models import is_model_in_modules
from torch import Tensor, nn

from deit_pipe.errors import InputError
from deit_pipe.storage import location

# The safetensors metadata key naming the model: the timm architecture, or for a ViT/DeiT the JSON of it and the
# constructor arguments it was built with (which rebuild it exactly). One key: safetensors writes metadata keys
# in no fixed order, and an export's bytes (its sha256, which a teacher store binds) must not vary.
MODEL_NAME_KEY = "model"
# timm modules whose constructors take img_size, patch_size, depth, embed_dim, num_heads.
VIT_MODULES = ("vision_transformer", "deit")
# Checkpoint layouts that wrap the state dict (DeiT's official checkpoints use {"model": ...}).
_WRAPPER_KEYS = ("model", "state_dict")


def export_safetensors(model: nn.Module, url: str) -> str:
    """Write the model's state dict to `url` (committed atomically); returns the file's sha256."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {}
    if hasattr(model, "pretrained_cfg"):
        name = model.pretrained_cfg["architecture"]
        vit = is_model_in_modules(name, VIT_MODULES)
        metadata[MODEL_NAME_KEY] = json.dumps({"name": name, "args": vit_args(model)}, sort_keys=True) if vit else name
    data = safetensors.torch.save(state, metadata=metadata)
    location.put_atomic(url, data)
    return hashlib.sha256(data).hexdigest()


def vit_args(model: nn.Module) -> dict[str, int]:
    """The timm ViT/DeiT constructor arguments that give `model`'s shapes (read from the model itself)."""
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    return {"img_size": img[0], "patch_size": patch[0], "depth": len(model.blocks), "embed_dim": model.embed_dim,
            "num_heads": model.blocks[0].attn.num_heads, "num_classes": model.num_classes}


def exported_model(metadata: dict[str, str]) -> tuple[str | None, dict[str, int]]:
    """(timm architecture or None, constructor arguments) a weights file's metadata names."""
    value = metadata.get(MODEL_NAME_KEY)
    if value is None or not value.startswith("{"):
        return value, {}
    named = json.loads(value)
    return named["name"], named["args"]


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file (header: u64 little-endian length, then JSON)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})


def _load_safetensors(data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    return safetensors.torch.load(data), safetensors_metadata(data)


class _Refused(Exception):
    """A file read_weights will not load, with the reason for the user."""


def _load_torch(data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4": the refusal says enough
        try:
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's own message advises weights_only=False, which would run whatever the file holds: never passed on.
            if "Unsupported global" in str(exc):
                raise _Refused("it holds Python objects other than tensors, which a weights-only load refuses to "
                               "run; save a state dict of tensors (or safetensors)") from None
            reason = re.search(r"WeightsUnpickler error:\s*([^\n.]*)", str(exc))
            raise _Refused(f"not a checkpoint a weights-only load can read ({reason[1] if reason else 'unpickling'})"
                           f"; save a state dict of tensors with torch.save (or safetensors)") from None
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key], {}
    return checkpoint, {}


def read_weights(url: str) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """(state dict, metadata, sha256 of the file) from a local path or fsspec URL."""
    try:
        data = location.read_bytes(url)
    except FileNotFoundError:
        raise InputError(f"weights file not found: {url}") from None
    load = _load_safetensors if url.endswith(".safetensors") else _load_torch
    try:
        state_dict, metadata = load(data)
    except _Refused as exc:
        raise InputError(f"cannot read weights {url}: {exc}") from None
    except Exception as exc:  # not a checkpoint at all: torch and safetensors raise several types
        kind = "safetensors" if url.endswith(".safetensors") else "torch"
        raise InputError(f"cannot read weights {url}: not a {kind} checkpoint ({type(exc).__name__}: {exc})"
                         .splitlines()[0]) from None
    return state_dict, metadata, hashlib.sha256(data).hexdigest()
