"""An ImageNet-style ImageFolder on any fsspec URL: its splits, their class folders and image files.

SRC holds train/ and/or val/ (or is itself one split, named after its folder); each split holds one folder
per class. Labels are the index of the class folder in train's sorted list, so class c means the same class
in both splits. Files are listed sorted by (class, relative path); hidden files, files outside a class folder
and files whose name is not an image's are skipped and counted.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass

from deit_pipe.data.images import is_image_name
from deit_pipe.errors import InputError
from deit_pipe.storage.location import join, list_files, resolve

SPLITS = ("train", "val")


@dataclass(frozen=True)
class SplitSource:
    """One split folder: its URL, the class names that give labels, and its image files."""

    split: str
    url: str
    classes: list[str]
    files: list[str]  # relative to the split folder, sorted by (class, relative path)
    sizes: list[int]
    ignored: dict[str, int]  # deliberately skipped: hidden, non_image, outside_class


def find_splits(src: str) -> list[SplitSource]:
    """SRC's splits: train/ and/or val/ under it, or SRC itself as one split named after its folder."""
    fs, path = resolve(src)
    if not fs.isdir(path):
        raise InputError(f"SRC {src} does not exist or is not a folder")
    children = _subfolders(fs, path)
    if any(s in children for s in SPLITS):
        folders = {s: join(src, s) for s in SPLITS if s in children}
    else:
        folders = {posixpath.basename(path.rstrip("/")): src}
    classes = {}
    for split, url in folders.items():
        classes[split] = _subfolders(*resolve(url))
        if not classes[split]:
            raise InputError(f"no class folders in {url} (expected <class>/<image> as in ImageNet)")
    if "train" in classes and "val" in classes:
        extra = sorted(set(classes["val"]) - set(classes["train"]))
        if extra:
            raise InputError(
                f"{len(extra)} class folder(s) in val but not in train (first: {extra[0]}): labels would not match"
            )
    labels = classes.get("train")
    return [_list_split(s, url, labels or classes[s]) for s, url in folders.items()]


def _subfolders(fs, path: str) -> list[str]:
    return sorted(
        posixpath.basename(e["name"].rstrip("/"))
        for e in fs.ls(path, detail=True)
        if e["type"] == "directory" and not posixpath.basename(e["name"].rstrip("/")).startswith(".")
    )


def _list_split(split: str, url: str, classes: list[str]) -> SplitSource:
    ignored = Counter({"hidden": 0, "non_image": 0, "outside_class": 0})
    files = []
    for rel, size in list_files(url).items():
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            ignored["hidden"] += 1
        elif len(parts) == 1:
            ignored["outside_class"] += 1
        elif not is_image_name(parts[-1]):
            ignored["non_image"] += 1
        else:
            files.append((parts[0], rel, size))
    files.sort()
    if not files:
        raise InputError(f"no image files in the class folders of {url}")
    return SplitSource(split, url, classes, [f[1] for f in files], [f[2] for f in files], dict(ignored))
