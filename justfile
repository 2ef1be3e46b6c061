# deit-pipe recipes. Run through ./just on a fresh machine (it installs .venv first).

set shell := ["bash", "-euo", "pipefail", "-c"]

fmnist_src := "/usr/share/datasets/fashion-mnist"

default:
    @just --list

# Run the linter, then the whole test suite (CI runs exactly this). Three pytest workers on two cores, a test file
# each at a time (its module fixtures built once): most tests use one core, and the slow ones wait on processes
# starting and on retries' backoff, time a third worker fills (839 s against 913 with two, this machine).
test *args: fashion-mnist-source lint
    OMP_NUM_THREADS=1 python -m pytest -q -n 3 --dist loadfile {{args}}

# ruff (pyproject.toml [tool.ruff]): pyflakes, pycodestyle, import order, modern syntax, bugbear.
lint:
    ruff check .

# The suite without the slow multi-process tests.
test-fast *args: fashion-mnist-source
    OMP_NUM_THREADS=1 python -m pytest -q -n 2 --dist loadfile -m "not slow" {{args}}

# Debian's dataset-fashion-mnist (real images for the tests and the demo), installed when missing.
fashion-mnist-source:
    @[ -f {{fmnist_src}}/train-images-idx3-ubyte.gz ] || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

# Debian's Fashion-MNIST as an ImageFolder (train/<class>/*.png, val/<class>/*.png).
fashion-mnist dest="work-data/fashion-mnist" limit="0" val_limit="0": fashion-mnist-source
    deit-pipe fashion-mnist {{dest}} --source {{fmnist_src}} --limit {{limit}} --val-limit {{val_limit}}

# Benchmarks of the stages (ratios measured side by side in one run).
bench: fashion-mnist-source
    pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
    python bench/all.py

# The main job: Fashion-MNIST -> shards -> RegNet teacher -> teacher store -> four DeiT students (results + plots).
demo out="demo-output" *args: fashion-mnist-source
    deit-pipe demo {{out}} {{args}}

# Mutation testing (mutmut) of the modules correctness rests on, against the fast suite: score per module and
# the surviving mutants. Not part of CI (tens of minutes). `./just mutate --again` reruns only the survivors.
mutate *args: fashion-mnist-source
    pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[mutation]'
    python tests/mutate.py {{args}}
