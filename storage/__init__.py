"""Bottom floor: bytes on any fsspec URL (tar shards, manifest, teacher store, atomic commit)."""
