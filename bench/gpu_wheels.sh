#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what the device tool's GPU machine lacks for bench/gpu.sh: its python3 (3.12)
# has torch with CUDA, torchvision, timm, typer, fsspec, but nothing can be fetched there. Run here, once.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
wheels=(webdataset==1.0.2 braceexpand==0.1.7 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
        hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        pillow==12.3.0 typing_extensions==4.16.0)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
# DeepSpeed is published as source only: gpu.sh builds it there (no ops compiled: DS_BUILD_OPS=0).
python3 -m pip download --quiet --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
du -sh .whl
