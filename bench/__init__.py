"""Benchmark scripts, run as modules from the repository root: `python -m bench.NAME --help`.

They import sse-rl as installed, so install the checkout in editable mode (`pip install -e ".[gpu]"`): from the
root, a non-editable install is shadowed by the checkout's own `sse_rl/` folder, which holds no `models/`.
Shared helpers are in `bench.common`; results go to `bench/results/` with the device named.
"""
