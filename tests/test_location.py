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
