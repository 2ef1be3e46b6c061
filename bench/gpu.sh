#!/usr/bin/env bash
# The GPU check (issue 13): one command on the device tool's GPU machine, about 5 minutes on one H200.
#   here, once:  bash bench/gpu_wheels.sh            (what the machine lacks, into .whl/)
#   there:       bash bench/gpu.sh                    (run with carry [".whl"]; writes $OUT/gpu.md when OUT is set)
#   anywhere:    bash bench/gpu.sh --smoke            (the whole script, tiny, on whatever device is here)
# The machine's python3 holds torch with CUDA; the rest installs from .whl into /tmp/site, deit-pipe with it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ "${1:-}" != "--smoke" ] && [ -d .whl ]; then
    site=/tmp/site
    rm -rf "$site"  # a warm machine keeps the last run's install: pip --target would skip what is there
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$site" .whl/deepspeed-*.tar.gz
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" .
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    python=python3
else
    python=${PYTHON:-.venv/bin/python}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# Not from the checkout's root: there a child process started with `python -c` (the shard stage's forkserver)
# finds the root's own deit_pipe/ folder before the installed package, and has no deit_pipe.stages.
repo=$PWD
case $python in /* | python3) ;; *) python="$repo/$python" ;; esac
cd /tmp && "$python" "$repo/bench/gpu.py" ${OUT:+--out "$OUT/gpu.md"} "$@"
