"""Benchmarks: each module is a command, run from the repository root as a module, so that it
imports the project and `tests.support` as packages (`python -m bench.engine_bench --help`).
`make bench`, `make bench-gpu`, `make bench-affinity`, `make bench-load` and `bench/gpu_check.sh`
run them so."""
