"""storage.location: URLs fsspec cannot reach are the user's input, refused in one line."""

from __future__ import annotations

import importlib.util

import pytest

from deit_pipe.errors import InputError
from deit_pipe.storage.location import resolve


def test_an_unknown_protocol_is_refused_in_one_line():
    with pytest.raises(InputError, match=r"^foo://bucket/x: Protocol not known: foo$"):
        resolve("foo://bucket/x")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_a_protocol_whose_package_is_missing_names_the_package():
    """gs:// without the [gcs] extra: fsspec's own advice, as one line."""
    with pytest.raises(InputError, match=r"^gs://bucket/x: .*install gcsfs"):
        resolve("gs://bucket/x")


def test_a_write_the_disk_refuses_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    """ENOSPC mid-write: an EnvironmentFault (the machine, exit 3), and no temporary file beside the target."""
    import errno

    from deit_pipe.errors import EnvironmentFault
    from deit_pipe.storage import location

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(location.os, "fsync", full)
    with pytest.raises(EnvironmentFault, match=r"^no space left on the device \(or the quota\) writing .*/x\.bin \(3 "):
        location.put_atomic(str(tmp_path / "x.bin"), b"abc")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(location.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(EnvironmentFault, match=r"^write .*/x\.bin failed \(OSError: \[Errno 5\] I/O error\)"):
        location.put_atomic(str(tmp_path / "x.bin"), b"abc")  # a failing disk is the machine's too
    assert list(tmp_path.iterdir()) == []


def test_a_store_error_past_the_retries_names_the_operation_and_the_url_and_input_errors_pass():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from deit_pipe.errors import EnvironmentFault
    from deit_pipe.storage.location import storage_errors

    for failure in (OSError(16, "SlowDown"), EndpointConnectionError(endpoint_url="http://s3")):
        with pytest.raises(EnvironmentFault, match=r"^write s3://b/k failed \(\w+: .+\), also on retrying$") as fault:
            with storage_errors("write", "s3://b/k"):
                raise failure
        assert fault.value.rerun == "rerun with the same arguments (committed work is kept)"
    for about_the_input in (PermissionError("Access Denied"), NoCredentialsError()):
        with pytest.raises(InputError, match=r"^read s3://b/k: "):
            with storage_errors("read", "s3://b/k"):
                raise about_the_input
    with pytest.raises(FileNotFoundError):  # a missing object is the caller's to judge
        with storage_errors("read", "s3://b/k"):
            raise FileNotFoundError("no such key")


def test_an_exclusive_write_creates_once_and_never_replaces(tmp_path):
    """The lease's create-if-absent: the first writer gets True, a later one False with the object unchanged, even
    with the same bytes; no temporary file stays either way."""
    from deit_pipe.storage.location import put_atomic

    url = str(tmp_path / "lease" / "00000001.json")
    assert put_atomic(url, b"first", exclusive=True) is True
    assert put_atomic(url, b"second", exclusive=True) is False
    assert put_atomic(url, b"first", exclusive=True) is False
    assert (tmp_path / "lease" / "00000001.json").read_bytes() == b"first"
    assert put_atomic(url, b"third") is True  # not exclusive: replaces
    assert sorted(p.name for p in (tmp_path / "lease").iterdir()) == ["00000001.json"]


def test_files_behind_fsspecs_local_cache_of_a_remote_filesystem_are_read_through_it(tmp_path, monkeypatch):
    """filecache:: has "file" in its protocol's name yet holds no local path: reading its files with plain local
    reads found none of them (each image of a `filecache::s3://...` SRC rejected as unreadable)."""
    import fsspec

    from deit_pipe.storage.location import put_atomic, read_files

    memory = fsspec.filesystem("memory")
    memory.pipe("/cached-src/shirt/a.png", b"png bytes")
    monkeypatch.chdir(tmp_path)  # a wrong local read of "cached-src/..." would look here
    url = "filecache::memory://cached-src"
    found, missing = read_files(url, ["shirt/a.png", "shirt/missing.png"])
    assert found == b"png bytes" and isinstance(missing, FileNotFoundError)
    put_atomic(f"{url}/shirt/b.png", b"written")
    assert memory.cat("/cached-src/shirt/b.png") == b"written" and not list(tmp_path.iterdir())


def test_a_local_listing_is_fsspecs_find(tmp_path):
    """list_files on a local disk (its own scandir walk) lists what fsspec's find lists, with the same sizes:
    nested and hidden folders walked, a symlink (to a file, to a folder, broken, in a loop) a file of its
    target's size (0 when there is none) and never followed; and the same through a memory:// filesystem."""
    import os

    import fsspec

    from deit_pipe.storage.location import list_files

    root = tmp_path / "src"
    for rel, size in {"a/1.png": 3, "a/deep/er/2.jpg": 5, ".hidden/3.png": 7, "b/.4.png": 1, "top.txt": 0}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * size)
    (root / "c").mkdir()
    os.symlink(root / "a" / "deep" / "er" / "2.jpg", root / "c" / "to_file.jpg")
    os.symlink(root / "a", root / "c" / "to_folder")
    os.symlink(root / "gone.png", root / "c" / "broken.png")
    os.symlink(root / "c" / "loop.png", root / "c" / "loop.png")
    (root / "empty").mkdir()

    fs = fsspec.filesystem("file")
    found = fs.find(str(root), withdirs=False, detail=True)
    want = {path[len(str(root)) + 1 :]: info["size"] for path, info in found.items()}
    assert list_files(str(root)) == want == {
        "a/1.png": 3, "a/deep/er/2.jpg": 5, ".hidden/3.png": 7, "b/.4.png": 1, "top.txt": 0,
        "c/to_file.jpg": 5, "c/to_folder": want["c/to_folder"], "c/broken.png": 0, "c/loop.png": 0,
    }
    assert list_files(str(root) + "/") == want and list_files(f"file://{root}") == want

    memory = fsspec.filesystem("memory")
    for rel, size in {"a/1.png": 3, "a/deep/2.jpg": 5}.items():
        memory.pipe(f"/listing/{rel}", b"x" * size)
    assert list_files("memory://listing") == {"a/1.png": 3, "a/deep/2.jpg": 5}


def test_a_local_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    """fsspec's find leaves such a folder out, and its images with it; list_files says so in one line."""
    from deit_pipe.storage import location

    (tmp_path / "src" / "a").mkdir(parents=True)
    scandir = location.os.scandir

    def refuse(path):
        if str(path).endswith("/a"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(location.os, "scandir", refuse)
    with pytest.raises(InputError, match=r"^list .*/src: PermissionError: \[Errno 13\] Permission denied: '.*/src/a'$"):
        location.list_files(str(tmp_path / "src"))
