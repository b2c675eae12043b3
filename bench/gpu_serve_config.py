"""Writes a GPU variant of serve_config.yaml for benchmarks on a GPU machine without network:
the packaged model's entry becomes SmolLM2's shape with random weights (the packaged weights
do not travel there), on CUDA, with a batch of 256. With `--chunks-per-s` values, one such
model per value (named smollm2-random-VALUE), sharing the GPU, so one run of `bench.gpu_bench
--http` compares the replica's chunk rates side by side; without, one model at the default rate.
The ingress runs --ingress-replicas replicas (default 4: each relays its streams on one core, and
the GPU machine has 16).

    python -m bench.gpu_serve_config OUT.yaml [--database PATH] [--chunks-per-s 150,1000] [--ingress-replicas 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--database", default="/tmp/ray-chat-gpu/history.sqlite3")
    parser.add_argument("--chunks-per-s", default="", help="replica_chunks_per_s: one model per value")
    parser.add_argument("--ingress-replicas", type=int, default=4)
    args = parser.parse_args()
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"]["database_path"] = args.database
    app["args"]["ingress_num_replicas"] = args.ingress_replicas
    packaged = app["args"]["models"][0]
    rates: list[float | None] = [float(r) for r in args.chunks_per_s.split(",")] if args.chunks_per_s else [None]
    app["args"]["models"] = [
        {
            **packaged,
            "name": "smollm2-random" if rate is None else f"smollm2-random-{rate:g}",
            "aliases": [],
            "source": {"kind": "tiny_random", "shape": "smollm2"},
            "device": "cuda",
            "num_gpus": 1 / len(rates),
            # Of the GPU's free memory when the replica starts; the rest is left to a benchmark's own engine.
            "gpu_memory_fraction": 0.7 / len(rates),
            "max_batch_size": 256,
            "max_ongoing_requests": 300,
            "max_queued_requests": 300,
            "replica_chunks_per_s": rate,
        }
        for rate in rates
    ]
    Path(args.out).write_text(yaml.safe_dump(config, sort_keys=False))


if __name__ == "__main__":
    main()
