"""Writes a GPU variant of serve_config.yaml for benchmarks on a GPU machine without network:
the packaged model's entry becomes SmolLM2's shape with random weights (the packaged weights
do not travel there), on CUDA, reserving the GPU, with a batch of 256.

    python bench/gpu_serve_config.py OUT.yaml [--database PATH]
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
    args = parser.parse_args()
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"]["database_path"] = args.database
    model = app["args"]["models"][0]
    model.update(
        name="smollm2-random", aliases=[], source={"kind": "tiny_random", "shape": "smollm2"}, device="cuda",
        num_gpus=1, max_batch_size=256, max_ongoing_requests=300, max_queued_requests=300,
    )
    Path(args.out).write_text(yaml.safe_dump(config, sort_keys=False))


if __name__ == "__main__":
    main()
