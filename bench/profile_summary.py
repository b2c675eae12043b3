"""Where a profiled process spent its time: reads py-spy's collapsed stacks (`py-spy record
--format raw`, as `python -m bench.load_bench --profile DIR` writes them) and prints the functions with
the most samples, inclusive (anywhere on the stack) and self (at the top).

    .venv/bin/python -m bench.profile_summary DIR/FILE.txt [--top 40] [--match TEXT]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="", help="only stacks through a frame containing this text")
    args = parser.parse_args()
    for path in args.files:
        inclusive: Counter[str] = Counter()
        own: Counter[str] = Counter()
        total = 0
        for text in Path(path).read_text().splitlines():
            stack, _, count = text.rpartition(" ")
            frames = stack.split(";")
            if args.match and not any(args.match in frame for frame in frames):
                continue
            samples = int(count)
            total += samples
            own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples
        print(f"== {path}: {total} samples")
        for title, counts in (("inclusive", inclusive), ("self", own)):
            print(f"-- {title}")
            for frame, samples in counts.most_common(args.top):
                print(f"{100 * samples / max(total, 1):6.1f}%  {frame[:150]}")


if __name__ == "__main__":
    main()
