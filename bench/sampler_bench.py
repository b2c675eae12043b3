"""What sampling adds to a decode step: `sampler.draw` per batch size and sampling setting, on a
CUDA GPU replayed from a CUDA graph (as the engine runs it, so kernel launches cost what they
cost there) or eagerly on the CPU.

    python -m bench.sampler_bench [--device cuda] [--batches 1,16,64,256] [--module NAME ...] [--compile] [--profile B]

Random logits over SmolLM2's vocabulary (49,152) and a 2,048-token history per row. Each setting
runs the variant of the sampler the engine picks for it (`cuda_graphs.VARIANTS`). `--module FILE`
times other implementations of the sampler's interface side by side (e.g. an older copy of
`sampler.py`); `--compile` also times `draw` compiled by `torch.compile` (original defaults only: a compile per
batch size takes a while); `--profile B` prints
the heaviest kernels of one eager draw of B rows under the original's defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import astuple
from pathlib import Path

import torch

from deployments.engine import sampler
from deployments.engine.cuda_graphs import variant_for
from deployments.engine.sampling_params import SamplingParams

SETTINGS = {
    "greedy": SamplingParams(temperature=0, repeat_penalty=1.0),
    "greedy, penalty": SamplingParams(temperature=0, repeat_penalty=1.1, repeat_last_n=64),
    "original defaults": SamplingParams(temperature=0.7, top_p=0.9, repeat_penalty=1.1, repeat_last_n=64),
    "OpenAI defaults": SamplingParams(temperature=0.7, top_p=1.0, repeat_penalty=1.0),
    "top_k 40": SamplingParams(temperature=0.8, top_k=40, repeat_penalty=1.0),
    # OpenAI's penalties and a logit bias (10 tokens): the variant that does everything on a GPU.
    "OpenAI + penalties": SamplingParams(
        temperature=0.7,
        top_p=1.0,
        repeat_penalty=1.0,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias=tuple((token, -5.0) for token in range(10)),
    ),
}


class Case:
    """One batch of `batch` rows under `params`, for `module`'s `draw`: inputs built once."""

    def __init__(self, module, params: SamplingParams, batch: int, vocab: int, context: int, device: torch.device):
        self.module = module
        generator = torch.Generator().manual_seed(batch)
        self.pristine = (torch.randn(batch, vocab, generator=generator) * 3).to(device)
        self.logits = self.pristine.clone()
        self.history = torch.randint(0, vocab, (batch + 1, context), generator=generator).to(device)
        try:
            self.table = module.SlotSampling.empty(batch + 1, context, device)
        except TypeError:  # an implementation whose table holds no per-position draws
            self.table = module.SlotSampling.empty(batch + 1, device)
        if hasattr(self.table, "write"):  # all rows in one write, as the engine admits a step's newcomers
            self.table.write([self.table.entry(slot, params, slot, 100) for slot in range(batch)])
        else:  # an older implementation: one row at a time
            for slot in range(batch):
                self.table.set(slot, params, slot, 100)
        needs = module.Needs.of([params])  # an eager step skips what its rows do not need
        if device.type == "cuda":  # a replayed step runs the first graph variant that covers them
            needs = module.Needs(*astuple(variant_for(sampler.Needs(*astuple(needs)))))
        positions = torch.full((batch,), 100 + batch % 50, device=device)
        self.rows = module.StepRows(torch.arange(batch, device=device), positions, needs)
        self.eos = torch.tensor([2], device=device)

    def copy(self) -> None:
        self.logits.copy_(self.pristine)

    def step(self, draw) -> None:
        self.copy()
        draw(self.logits, self.rows, self.table, self.history, self.eos)


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def seconds_per_call(fn, device: torch.device, repeats: int) -> float:
    """fn's time: replayed from a CUDA graph on a GPU, called eagerly elsewhere."""
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuBLAS, Triton, torch.compile
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
        run()
        torch.cuda.synchronize()
    else:
        run = fn
        run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def profile(case: Case, device: torch.device) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    case.step(case.module.draw)
    with torch.profiler.profile(activities=activities) as prof:
        case.step(case.module.draw)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--module", action="append", default=[], type=Path, help="another sampler module to time (a .py file)")
    parser.add_argument("--compile", action="store_true", help="also time draw compiled by torch.compile")
    parser.add_argument("--profile", type=int, metavar="B", help="profile one eager draw of B rows")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    modules = {"sampler": sampler, **{path.stem: load_module(path) for path in args.module}}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{name}, torch {torch.__version__}; vocabulary {args.vocab}, history {args.context}; us per draw"
        f" ({'CUDA graph replay' if device.type == 'cuda' else 'eager'}), the logits' copy subtracted\n"
    )
    print(f"{'setting':<20}{'implementation':<34}" + "".join(f"{b:>10}" for b in batches))
    for setting, params in SETTINGS.items():
        for module_name, module in modules.items():
            draws = {module_name: module.draw}
            if args.compile and setting == "original defaults":
                draws[f"{module_name} compiled"] = torch.compile(module.draw, dynamic=False)
            for label, draw in draws.items():
                cells = []
                for batch in batches:
                    case = Case(module, params, batch, args.vocab, args.context, device)
                    base = seconds_per_call(case.copy, device, args.repeats)
                    total = seconds_per_call(lambda case=case, draw=draw: case.step(draw), device, args.repeats)
                    cells.append(f"{(total - base) * 1e6:10.1f}")
                print(f"{setting:<20}{label:<34}" + "".join(cells), flush=True)
    if args.profile:
        for module_name, module in modules.items():
            print(f"\n-- {module_name}, original defaults, {args.profile} rows, eager")
            profile(Case(module, SETTINGS["original defaults"], args.profile, args.vocab, args.context, device), device)


if __name__ == "__main__":
    main()
