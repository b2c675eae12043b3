"""Sustained load: what closed-loop users get through HTTP from the service as `make serve`
starts it, against the same model's engine driven in-process on the same machine, in one run.

For each API and user count, users send a new request as soon as their last answer ended, for
--duration seconds after --warmup seconds (not counted). The engine alone runs in a process of its
own while every process of the service is stopped (SIGSTOP), then the same users go through HTTP;
--rounds N alternates the two N times and prints the median ratio, as a noisy machine needs. Printed per run: tokens/s, requests/s,
time to first token and the gaps between text chunks (p50/p95, as the client saw them),
chunks/s, errors, and, through HTTP, the CPU seconds each kind of process spent (front: Serve's
proxy or HAProxy; ingress; model replica; history; controller; Ray's own; the load client) per
1,000 tokens and per request. Before the runs the service is left idle for --idle-window
seconds: what each kind spends a second doing nothing (Ray's and Serve's own loops) is printed,
and each run's CPU is printed again with that fixed cost taken out ("above idle"), the part that
grows with the load (docs/performance.md, "Sizing").

    .venv/bin/python -m bench.load_bench [--model tiny|packaged] [--device cpu|cuda]
        [--users 1,16,64,256] [--duration 30] [--api completions,original] [--short]
        [--front haproxy|python] [--ingress-replicas N] [--auth none|users] [--rounds N]

--model tiny: a tiny random model, whose forward pass costs almost nothing, so the stack's own
cost shows; --model packaged: the packaged SmolLM2 as serve_config.yaml serves it (what a
laptop user gets). --device cuda: SmolLM2's shape with random weights on the GPU, batch 256.
--short: answers of one token (the cost per request); users default to 32.
Answers are 256 tokens (EOS ignored where the API allows it) with the original's default
sampling (temperature 0.7, top_p 0.9, repeat penalty 1.1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.machine import cpu_name
from loadtests.processes import KINDS, cpu_by_kind, frozen, own_cpu_s, sample_tree, unwind_on_sigterm
from loadtests.service import RunningService, new_user_key, running_service, serve_environment
from loadtests.soak import soak
from loadtests.users import Answer, Users, Window, Workload, percentile, stagger

REPO_ROOT = Path(__file__).resolve().parent.parent

MODEL_NAME = "bench-model"
IDLE_SETTLE_S = 5.0
RAMP_SHARE = 0.8  # of the warm-up, over which the users start one by one (`stagger`)


def model_config(preset: str, device: str) -> dict:
    """The benchmarked model's entry of serve_config.yaml's `models`."""
    if device == "cuda":
        return {
            "name": MODEL_NAME,
            "source": {"kind": "tiny_random", "shape": "smollm2"},
            "device": "cuda",
            "num_gpus": 1,
            "max_batch_size": 256,
            "max_ongoing_requests": 300,
            "max_queued_requests": 300,
            "context_length": 2048,
        }
    if preset == "tiny":
        # The setup: the stack's cost, with a model that costs almost nothing.
        return {
            "name": MODEL_NAME,
            "source": {"kind": "tiny_random"},
            "max_batch_size": 64,
            "torch_threads": 1,
            "num_cpus": 1,
            "max_ongoing_requests": 256,
        }
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    packaged = dict(config["applications"][0]["args"]["models"][0])
    return packaged | {"name": MODEL_NAME, "aliases": []}


# --- the engine alone ----------------------------------------------------------------------


def engine_alone(spec: dict) -> None:
    """Runs in a process of its own (`--engine-alone`): the model's `LLMServer`, as a replica
    holds it, loaded once; each line on stdin (`{"api": ..., "users": ...}`) is a run of that
    many closed-loop users in-process, answered by a line of JSON on stdout."""
    from deployments.engine.protocol import GenerationRequest
    from deployments.llm_server import LLMServer
    from deployments.model_registry import ModelConfig
    from serve_app.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest

    answers_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else written to stdout (a library's print) goes to the log
    server = LLMServer(ModelConfig.model_validate(spec["model"]))

    def request(workload: Workload) -> GenerationRequest:
        body = workload.body()
        if workload.api == "original":
            params = GenerateRequest.model_validate(body).to_sampling_params()
            return GenerationRequest(messages=[{"role": "user", "content": workload.prompt}], params=params)
        if workload.api == "chat":
            chat = ChatCompletionRequest.model_validate(body)
            return GenerationRequest(messages=chat.chat_messages(), params=chat.to_sampling_params())
        completion = CompletionRequest.model_validate(body)
        return GenerationRequest(prompt=completion.prompt_text, params=completion.to_sampling_params())

    async def ask(generation: GenerationRequest) -> Answer:
        answer = Answer(sent=time.perf_counter(), status=200)
        async for output in server.generate(generation):
            if output.text:
                answer.chunks.append(time.perf_counter())
            answer.tokens = output.completion_tokens
        answer.ended = time.perf_counter()
        return answer

    async def run(workload: Workload, users: int) -> dict:
        generation = request(workload)
        answers: list[Answer] = []
        stop_at = time.perf_counter() + spec["warmup"] + spec["duration"]

        async def user(delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            while time.perf_counter() < stop_at:
                answers.append(await ask(generation))

        start = time.perf_counter() + spec["warmup"]
        cpu = asyncio.create_task(_cpu_between(start, start + spec["duration"]))
        await asyncio.gather(*(user(delay) for delay in stagger(users, spec["warmup"] * RAMP_SHARE)))
        window = Window.of(answers, start, start + spec["duration"])
        return {"window": window.__dict__, "cpu_s": await cpu}

    async def serve_runs() -> None:
        loop = asyncio.get_running_loop()
        print(json.dumps({"ready": True}), file=answers_out, flush=True)
        while asked := await loop.run_in_executor(None, sys.stdin.readline):
            run_spec = json.loads(asked)
            workload = Workload(run_spec["api"], MODEL_NAME, spec["max_tokens"])
            print(json.dumps(await run(workload, run_spec["users"])), file=answers_out, flush=True)

    try:
        asyncio.run(serve_runs())
    finally:
        server.engine.shutdown()


async def _cpu_between(start: float, end: float) -> float:
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    before = own_cpu_s()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    return own_cpu_s() - before


class EngineAlone:
    """`engine_alone` in a child process, kept for the whole benchmark: the model loads once, and
    the engine's runs can alternate with the service's. The child is idle (blocked on its stdin)
    while the service runs, and the service is frozen while the child runs."""

    def __init__(self, spec: dict) -> None:
        self.log = Path(tempfile.mkdtemp(prefix="engine-alone-")) / "engine.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.load_bench", "--engine-alone", json.dumps(spec)],
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )

    def _answer(self) -> dict:
        assert self.process.stdout is not None
        if not (text := self.process.stdout.readline()):
            tail = "".join(self.log.read_text().splitlines(keepends=True)[-20:])
            raise RuntimeError(f"the engine-alone process ended (exit status {self.process.wait()}):\n{tail}")
        return json.loads(text)

    def wait_ready(self) -> None:
        self._answer()

    def run(self, api: str, users: int) -> tuple[Window, float]:
        """The window of a run of `users` users, and the CPU seconds the process spent in it."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"api": api, "users": users}) + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        return Window(**answer["window"]), answer["cpu_s"]

    def close(self) -> None:
        """Ends the process: its stdin's end ends its loop; killed if it is still loading a
        minute later (the service failed to start meanwhile)."""
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- the service through HTTP ---------------------------------------------------------------


async def http_run(
    url: str, root_pid: int, workload: Workload, users: int, args: argparse.Namespace
) -> tuple[Window, dict[str, float]]:
    """The users' window through HTTP, and the CPU seconds each kind of process (and the client)
    spent in it."""
    client = Users(url, workload, args.headers)
    marks: dict[str, object] = {}

    async def sample_window(start: float, end: float) -> None:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        marks["before"], marks["own_before"] = sample_tree(root_pid), own_cpu_s()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        marks["after"], marks["own_after"] = sample_tree(root_pid), own_cpu_s()

    start = time.perf_counter() + args.warmup
    sampling = asyncio.create_task(sample_window(start, start + args.duration))
    profiling = asyncio.create_task(profile(root_pid, start, args, f"{workload.api}-{users}"))
    answers = await client.run(users, args.warmup + args.duration, ramp_s=args.warmup * RAMP_SHARE)
    await sampling
    await profiling
    if workload.api == "original":
        await client.stored_tokens(answers)
    window = Window.of(answers, start, start + args.duration)
    cpu = cpu_by_kind(marks["before"], marks["after"])  # type: ignore[arg-type]
    cpu["client"] = marks["own_after"] - marks["own_before"]  # type: ignore[operator]
    return window, cpu


async def profile(root_pid: int, start: float, args: argparse.Namespace, label: str) -> None:
    """With --profile DIR: py-spy records the front's, ingress's, model's and history's Python processes over
    the measured window, as collapsed stacks (DIR/LABEL-KIND-PID.txt; `python -m bench.profile_summary`
    reads them)."""
    if not args.profile:
        return
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    spies = [
        await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(sample.pid),
            "--duration",
            str(int(args.duration)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out / f"{label}-{sample.kind}-{sample.pid}.txt"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for sample in sample_tree(root_pid)
        if sample.kind in ("front", "ingress", "model", "history") and sample.name.startswith("ray::")
    ]
    await asyncio.gather(*(spy.wait() for spy in spies))


async def burst(url: str, users: int, max_tokens: int) -> list[Answer]:
    client = Users(url, Workload("original", MODEL_NAME, max_tokens))
    answers = await client.burst(users)
    await client.stored_tokens(answers)
    return answers


def burst_report(answers: list[Answer]) -> str:
    """Of a burst: how many were answered (and whether each answer was whole: stored complete,
    every token asked), how many refused and how fast."""
    accepted = [a for a in answers if a.status == 200]
    whole = [a for a in accepted if a.ok]
    refused = [a.ended - a.sent for a in answers if a.status == 503]
    other = sorted({a.status for a in answers} - {200, 503})
    lines = [
        f"{len(answers)} users asking at once: {len(accepted)} answered ({len(whole)} whole, "
        f"{sum(a.tokens for a in whole)} tokens stored), {len(refused)} refused with 503, other statuses {other or 'none'}",
    ]
    if refused:
        lines.append(
            f"  refusals after {min(refused) * 1e3:.0f} ms (fastest), p50 {percentile(refused, 50) * 1e3:.0f} ms, "
            f"p95 {percentile(refused, 95) * 1e3:.0f} ms, slowest {max(refused) * 1e3:.0f} ms after each user's request"
        )
    if accepted:
        ttft = [t for a in accepted if (t := a.ttft_s) is not None]
        lines.append(f"  answered: TTFT p50 {percentile(ttft, 50):.2f} s, p95 {percentile(ttft, 95):.2f} s")
    return "\n".join(lines)


# --- the report -------------------------------------------------------------------------------


def line(label: str, window: Window, engine_tps: float | None = None) -> str:
    ratio = f" {window.tokens_per_s / engine_tps:5.2f}x" if engine_tps else "       "
    return (
        f"  {label:<14}{window.tokens_per_s:9.0f}{ratio}{window.requests_per_s:8.1f}"
        f"{percentile(window.ttft_s, 50) * 1e3:9.1f}{percentile(window.ttft_s, 95) * 1e3:8.1f}"
        f"{percentile(window.gaps_s, 50) * 1e3:9.1f}{percentile(window.gaps_s, 95) * 1e3:8.1f}"
        f"{window.chunks_per_s:9.0f}{len(window.errors):7d}"
    )


HEADER = f"  {'':<14}{'tok/s':>9}{'':7}{'req/s':>8}{'TTFT p50':>9}{'p95':>8}{'gap p50':>9}{'p95':>8}{'chunks/s':>9}{'errors':>7}"


async def idle_cpu(root_pid: int, seconds: float) -> dict[str, float]:
    """CPU seconds a second each kind of process spends while nobody asks anything (after a few
    seconds' settling: the controller and the replicas are still busy just after ready)."""
    await asyncio.sleep(IDLE_SETTLE_S)
    before = sample_tree(root_pid)
    await asyncio.sleep(seconds)
    return {kind: spent / seconds for kind, spent in cpu_by_kind(before, sample_tree(root_pid)).items()}


def not_model(spent: dict[str, float]) -> float:
    """What every process of the service but the model replicas spent (the client is not one)."""
    return sum(spent[kind] for kind in KINDS if kind != "model")


def idle_line(idle: dict[str, float]) -> str:
    return (
        f"idle service, CPU ms a second: {', '.join(f'{kind} {idle[kind] * 1e3:.1f}' for kind in KINDS)}; "
        f"not model {not_model(idle) * 1e3:.1f}\n"
    )


def cpu_lines(cpu: dict[str, float], window: Window, idle: dict[str, float] | None = None) -> list[str]:
    """CPU per 1,000 tokens and per request, by kind; with the idle service's rates (`idle_cpu`),
    the same again less what each kind would have spent idle over the window's seconds."""
    kinds = [*KINDS, "client"]
    tables = [("", cpu)]
    if idle:
        tables.append((" above idle", {kind: spent - idle.get(kind, 0.0) * window.seconds for kind, spent in cpu.items()}))
    lines = [f"  CPU ms                     {''.join(f'{k:>11}' for k in kinds)}{'not model':>11}"]
    for count, unit, digits in ((window.tokens / 1000, "per 1,000 tok", 1), (window.requests, "per request", 2)):
        if not count:
            continue
        for label, spent in tables:
            row = "".join(f"{spent[k] * 1e3 / count:11.{digits}f}" for k in kinds)
            lines.append(f"  {unit + label:<25}{row}{not_model(spent) * 1e3 / count:11.{digits}f}")
    return lines


def main() -> None:
    unwind_on_sigterm()  # a killed benchmark must not leave the service frozen
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "packaged"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--users", default=None, help="comma-separated user counts (default 1,16,64,256; --short: 32)")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before each measured window")
    parser.add_argument("--api", default="completions,original", help="completions, chat, original (comma-separated)")
    parser.add_argument("--short", action="store_true", help="1-token answers: the cost per request")
    parser.add_argument("--front", choices=["haproxy", "python"], default=None, help="default: serve.env's")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model setting (YAML value), e.g. replica_chunks_per_s=1000",
    )
    parser.add_argument("--ingress-replicas", type=int, default=None, help="default: the app's")
    parser.add_argument(
        "--auth", choices=["none", "users"], default="none", help="users: every request with a user's key (its lookup and lease)"
    )
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--profile", metavar="DIR", help="py-spy the front, ingress and model processes into DIR")
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="a soak of MINUTES at --users users (default 64)")
    parser.add_argument("--soak-window", type=float, default=5.0, help="minutes of warm-up, and of each window compared")
    parser.add_argument("--burst", type=int, metavar="N", help="N users start a conversation each, then ask at once")
    parser.add_argument("--skip-engine", action="store_true", help="only through HTTP")
    parser.add_argument(
        "--idle-window", type=float, default=10.0, help="seconds the idle service is measured before the runs (0: not)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="the engine alone and through HTTP, alternated this many times (the median ratio)"
    )
    parser.add_argument(
        "--idle-service",
        action="store_true",
        help="the engine alone runs beside the idle service, not a frozen one: what the path costs, without what the service's idling costs",
    )
    parser.add_argument("--engine-alone", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_alone:
        engine_alone(json.loads(args.engine_alone))
        return
    if args.front is None:
        args.front = "haproxy" if serve_environment().get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "python"
    users = [int(u) for u in (args.users or ("32" if args.short else "64" if args.soak else "1,16,64,256")).split(",")]
    apis = args.api.split(",")
    max_tokens = 1 if args.short else 256
    model = model_config(args.model, args.device) | {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    print(
        f"{cpu_name()}, {os.cpu_count()} cores; model {args.model} on {args.device}; "
        f"{max_tokens}-token answers; front {args.front}; {args.duration:g} s per run after {args.warmup:g} s\n",
        flush=True,
    )
    spec = {
        "model": model,
        "max_tokens": max_tokens,
        "warmup": args.warmup,
        "duration": args.duration,
    }
    if args.auth == "users" and (args.burst or args.soak):
        parser.error("--auth users measures the closed-loop runs, not --burst or --soak")
    app_args: dict = {"ingress_num_replicas": args.ingress_replicas} if args.ingress_replicas else {}
    env, args.headers = {"RAY_CHAT_AUTH": args.auth}, {}
    if args.auth == "users":
        # One person sends the whole load: what a key's lookup and a stream's lease cost, not the limit.
        app_args["quotas"] = {"concurrent_streams": None}
    if args.burst:
        with running_service([model], args.port, args.front, app_args, env) as served_app:
            print(burst_report(asyncio.run(burst(served_app.url, args.burst, max_tokens))))
        return
    if args.soak:
        with running_service([model], args.port, args.front, app_args, env) as served_app:
            report = asyncio.run(
                soak(
                    served_app.url,
                    served_app.launcher.pid,
                    served_app.database,
                    MODEL_NAME,
                    users[0],
                    args.soak * 60,
                    warmup_s=args.soak_window * 60,
                    max_tokens=max_tokens,
                )
            )
            print(report.render(window_s=args.soak_window * 60))
        return
    engine = None if args.skip_engine else EngineAlone(spec)
    try:
        with running_service([model], args.port, args.front, app_args, env) as served_app:
            if engine:
                engine.wait_ready()  # it loaded the model while the service started
            if args.auth == "users":
                args.headers = {"Authorization": f"Bearer {new_user_key(served_app.database, 'bench')}"}
            idle = asyncio.run(idle_cpu(served_app.launcher.pid, args.idle_window)) if args.idle_window > 0 else None
            if idle:
                print(idle_line(idle), flush=True)
            for api in apis:
                for count in users:
                    workload = Workload(api, MODEL_NAME, max_tokens)
                    rounds = [measure_round(engine, served_app, workload, count, args) for _ in range(args.rounds)]
                    print(rounds_report(api, count, rounds, idle), flush=True)
    finally:
        if engine:
            engine.close()


@dataclass
class Round:
    """The engine alone (None with --skip-engine) and the same users through HTTP."""

    served: Window
    cpu: dict[str, float]  # through HTTP, by process kind (`http_run`)
    alone: Window | None = None
    alone_cpu_s: float = 0.0  # the engine-alone process's


def measure_round(
    engine: EngineAlone | None, served_app: RunningService, workload: Workload, users: int, args: argparse.Namespace
) -> Round:
    """The engine alone (the service frozen meanwhile: none of its processes runs beside it; with
    --idle-service it idles beside it), then the same users through HTTP: measured minutes apart,
    a noisy machine's phases would decide the ratio."""
    alone, alone_cpu_s = None, 0.0
    if engine:
        with contextlib.nullcontext() if args.idle_service else frozen(served_app.launcher.pid):
            alone, alone_cpu_s = engine.run(workload.api, users)
    served, cpu = asyncio.run(http_run(served_app.url, served_app.launcher.pid, workload, users, args))
    return Round(served, cpu, alone, alone_cpu_s)


def rounds_report(api: str, users: int, rounds: list[Round], idle: dict[str, float] | None = None) -> str:
    lines = [f"{api}, {users} user(s){f', {len(rounds)} rounds' if len(rounds) > 1 else ''}", HEADER]
    for each in rounds:
        if each.alone:
            lines.append(line("engine alone", each.alone))
        lines.append(line("through HTTP", each.served, each.alone.tokens_per_s if each.alone else None))
    ratios = [each.served.tokens_per_s / each.alone.tokens_per_s for each in rounds if each.alone]
    if len(ratios) > 1:
        listed = " ".join(f"{r:.2f}x" for r in ratios)
        lines.append(
            f"  through HTTP / engine alone, median of {len(ratios)} rounds: {statistics.median(ratios):.2f}x ({listed})"
        )
    served = Window.merged([each.served for each in rounds])
    lines += cpu_lines({kind: sum(each.cpu[kind] for each in rounds) for kind in rounds[0].cpu}, served, idle)
    if alone_tokens := sum(each.alone.tokens for each in rounds if each.alone):
        per_1000 = sum(each.alone_cpu_s for each in rounds) / alone_tokens * 1e6
        lines.append(f"  engine alone: its process {per_1000:.1f} ms per 1,000 tok")
    if served.errors:
        lines.append(f"  first error: {served.errors[0]}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
