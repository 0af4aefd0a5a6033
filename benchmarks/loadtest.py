"""HTTP load test with h2load: capacity, sustained load, 2x overload, a memory soak, and Ray Serve replicas.

    python benchmarks/loadtest.py runs/quickstart/best            # writes benchmarks/LOADTEST.md

The load comes from h2load (Debian/Ubuntu package `nghttp2-client`), a load generator written in C: on
the same machine it takes a few percent of one core where a Python generator competes with the server
for the CPUs it measures. Every server runs in a child process on 127.0.0.1 and every load phase is
bounded in time; one h2load process per built-in review sends that review, one text per request, and
logs every answer's status and latency. Phases against the single-process server
(`badge.serve.run_server`, its default admission control):

1. capacity: closed loop (clients each sending again as soon as answered), as many clients as the
   queue holds; capacity = answered requests per second. Every request of every phase opens its own
   connection, so capacity includes the same per-connection cost as the open-loop phases.
2. sustained: open loop at 80 % of capacity (a new connection per request at a fixed rate, whatever
   the server does); must end with 0 errors.
3. overload: open loop at 200 % of capacity; the excess must get 503 in under 50 ms (p99), and the
   accepted requests must keep p99 under twice the sustained p99.
4. soak: 80 % of capacity for `--soak-s` seconds while the server's resident memory is sampled.

Then the same model behind Ray Serve (`badge.distributed.serve_on_ray`) with each of `--ray-replicas`:
capacity and sustained 80 %. Results go to a Markdown table (default benchmarks/LOADTEST.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy
from prometheus_client.parser import text_string_to_metric_families

HOST = "127.0.0.1"
ANSWER_TIMEOUT_S = 30  # h2load gives up on a connection that shows no activity for this long
REVIEWS = [
    "A warm, funny film with a great cast.",
    "The plot drags and the jokes fall flat.",
    "Beautifully shot, but the story never comes together.",
    "One of the best thrillers of the year.",
    "I walked out halfway through.",
    "Charming, light and over too soon.",
    "The acting is wooden and the dialogue is worse.",
    "A bold, strange and unforgettable debut.",
    "Nothing new, yet it is hard not to enjoy it.",
    "Two hours of noise with no heart at all.",
    "The lead gives a quiet, devastating performance that carries the whole film.",
    "Predictable from the first scene to the last.",
    "Smart writing, sharp editing and a killer soundtrack.",
    "It wants to be profound but ends up merely dull.",
    "A crowd-pleaser in the best sense of the word.",
    "The sequel nobody asked for, and it shows.",
]
# Run in the server processes; options arrive as one JSON argument.
SERVER_CODE = """
import json, sys
from badge.serve import run_server
options = json.loads(sys.argv[1])
run_server(options.pop("model_dir"), **options)
"""
RAY_SERVER_CODE = """
import json, sys
from badge.distributed import serve_on_ray
options = json.loads(sys.argv[1])
serve_on_ray(options.pop("model_dir"), **options)
"""


@dataclass
class Phase:
    """One bounded h2load run and what came back: latencies (ms) by HTTP status, and requests never answered."""

    name: str
    offered_rps: float | None  # None: closed loop
    clients: int  # closed loop: clients that each send again as soon as answered; open loop: requests
    seconds: float  # closed loop with `requests`: the target, replaced by the span the answers took
    requests: int | None = None  # closed loop: requests in all, each on a new connection (None: keep-alive, timed)
    latencies_ms: dict[int, list[float]] = field(default_factory=dict)
    unanswered: int = 0  # sent but never answered (connection errors, timeouts, cut off at the end)
    server_refusals: tuple[float, float] | None = None  # (503s, 503s answered within 50 ms), server's own clock

    @property
    def accepted_count(self) -> int:
        return len(self.latencies_ms.get(200, []))

    @property
    def refused_count(self) -> int:
        return len(self.latencies_ms.get(503, []))

    @property
    def failures(self) -> int:
        """Answers other than 200 and 503, plus requests never answered."""
        return self.unanswered + sum(len(v) for status, v in self.latencies_ms.items() if status not in (200, 503))

    @property
    def failure_kinds(self) -> dict[str, int]:
        kinds = {f"status {s}": len(v) for s, v in self.latencies_ms.items() if s not in (200, 503)}
        return {**kinds, **({"unanswered": self.unanswered} if self.unanswered else {})}

    @property
    def accepted_rps(self) -> float:
        return self.accepted_count / self.seconds

    def percentile(self, which: str, q: float) -> float:
        values = self.latencies_ms.get(200 if which == "accepted" else 503, [])
        return float(numpy.percentile(values, q)) if values else math.nan


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(code: str, options: dict, log: Path) -> subprocess.Popen:
    """Start a server child process in its own session (so everything it spawns can be stopped with it)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(options)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_server(process: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGINT (graceful: finish accepted requests), then SIGKILL whatever is left of the process's session."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children it started (Ray's raylet, workers) share its session
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def wait_until_ready(process: subprocess.Popen, url: str, timeout_s: float, log: Path) -> dict:
    """Poll /readyz until the server says ready; return its body."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, trust_env=False, timeout=5) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {process.returncode}; its log:\n{log.read_text()[-3000:]}"
                )
            try:
                response = http.get("/readyz")
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not ready within {timeout_s} s; its log:\n{log.read_text()[-3000:]}")


def h2load_command(url: str, phase: Phase, body: Path, log: Path, processes: int) -> tuple[list[str], float]:
    """One h2load process's command line for its share of `phase`, and the request rate it offers (0: closed loop).

    Closed loop: `clients / processes` clients, each sending again as soon as answered; with `requests`,
    that many requests in all, each on a new connection (as in the open-loop phases, so capacity pays the
    same per-request costs), else keep-alive connections for `seconds` (h2load's timed mode can hang
    when the server closes connections). Open loop: a new connection every `--rate-period` milliseconds
    whatever the server does, so a slow server faces the same arrivals as a fast one.
    """
    command = ["h2load", "--h1", "-H", "Content-Type: application/json", "-d", str(body), f"--log-file={log}"]
    command += ["-N", f"{ANSWER_TIMEOUT_S}s"]  # a connection silent this long is cut and counted as a timeout
    if phase.offered_rps is None:
        clients = max(1, phase.clients // processes)
        if phase.requests is None:
            command += ["-c", str(clients), "-D", f"{max(1, round(phase.seconds))}"]
        else:
            requests = max(clients, round(phase.requests / processes))
            command += ["-H", "Connection: close", "-c", str(clients), "-n", str(requests)]
        rate = 0.0
    else:
        period_ms = max(1, round(1000 * processes / phase.offered_rps))  # h2load takes whole milliseconds
        rate = 1000 / period_ms
        requests = max(1, round(rate * phase.seconds))
        command += ["-r", "1", f"--rate-period={period_ms}ms", "-c", str(requests), "-n", str(requests)]
    return [*command, f"{url}/v1/classify"], rate


def run_h2load(url: str, phase: Phase, bodies: list[Path], workdir: Path) -> Phase:
    """Run `phase` as one h2load process per text, started a little apart; fill `phase` from their logs.

    Each process writes one line per answered request (start, status, microseconds to the end of the
    answer); requests that got no answer (connection errors, timeouts) come from h2load's summary.
    """
    slug = phase.name.replace(" ", "-").replace("%", "pct")
    processes, rates = [], []
    for index, body in enumerate(bodies):
        log = workdir / f"{slug}-{index}.tsv"
        command, rate = h2load_command(url, phase, body, log, len(bodies))
        rates.append(rate)
        processes.append((subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log))
        if phase.offered_rps:
            time.sleep(1 / phase.offered_rps)  # spread the processes' arrivals over each period
    if phase.offered_rps:
        phase.offered_rps = sum(rates)  # what h2load really offers, its periods being whole milliseconds
    latencies: dict[int, list[float]] = {}
    first_start, last_end = math.inf, -math.inf
    for process, log in processes:
        try:
            output, _ = process.communicate(timeout=phase.seconds + ANSWER_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            for other, _ in processes:
                other.kill()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"h2load failed ({process.returncode}): {output[-2000:]}")
        summary = re.search(r"(\d+) errored, (\d+) timeout", output)
        if summary is None:
            raise RuntimeError(f"h2load printed no summary: {output[-2000:]}")
        for line in log.read_text().splitlines():
            start, status, micros = (int(value) for value in line.split("\t"))
            latencies.setdefault(status, []).append(micros / 1000)
            first_start, last_end = min(first_start, start), max(last_end, start + micros)
        phase.unanswered += int(summary.group(1)) + int(summary.group(2))
    phase.latencies_ms = latencies
    if phase.requests is not None and last_end > first_start:
        phase.seconds = (last_end - first_start) / 1e6
    return phase


def refusals_within_50ms(url: str) -> tuple[float, float]:
    """From the server's /metrics: 503 answers to /v1/classify so far, and how many took at most 50 ms."""
    total = fast = 0.0
    text = httpx.get(f"{url}/metrics", trust_env=False, timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("endpoint") != "/v1/classify" or labels.get("status") != "503":
                continue
            if sample.name == "badge_request_duration_seconds_count":
                total = sample.value
            elif sample.name == "badge_request_duration_seconds_bucket" and labels.get("le") == "0.05":
                fast = sample.value
    return total, fast


class MemorySampler:
    """Samples a process's resident memory (VmRSS, MiB) every `every_s` seconds in a background thread."""

    def __init__(self, pid: int, every_s: float = 5.0) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - start, self.rss_mib()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def open_loop(name: str, rps: float, seconds: float) -> Phase:
    return Phase(name, rps, math.ceil(rps * seconds), seconds)


def h2load_version() -> str:
    output = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=True).stdout
    return output.strip().split("\n")[0]


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def measure_server(
    name: str, code: str, options: dict, args: argparse.Namespace, bodies: list[Path], workdir: Path, soak: bool
) -> tuple[dict, list[Phase], list[tuple[float, float]], list[str]]:
    """Start one server, run its phases, stop it; return /readyz at start, phases, memory samples, load averages."""
    port = free_port()
    log = workdir / f"{name}.log"
    process = start_server(code, {**options, "host": HOST, "port": port}, log)
    url = f"http://{HOST}:{port}"
    phases, memory, loads = [], [], [load_average()]
    try:
        ready = wait_until_ready(process, url, args.startup_timeout_s, log)
        # closed loop never overfills the queue (pure capacity): one batch running and one waiting, what
        # the queue holds even while the model is saturated; at least one client per text
        clients = max(len(bodies), args.max_batch_size + min(ready["max_queue"], args.max_batch_size))
        warm_up = run_h2load(url, Phase("warm-up", None, len(bodies), 5), bodies, workdir)
        # as many requests as the warm-up's rate fills `capacity_s` with (keep-alive is a little faster)
        requests = max(clients, round(warm_up.accepted_rps * args.capacity_s))
        capacity = Phase(f"{name} capacity", None, clients, args.capacity_s, requests=requests)
        capacity = run_h2load(url, capacity, bodies, workdir)
        phases.append(capacity)
        rate = capacity.accepted_rps
        print(f"{name}: capacity {rate:.1f} req/s with {clients} closed-loop connections", flush=True)
        sustained = run_h2load(url, open_loop(f"{name} sustained 80%", 0.8 * rate, args.phase_s), bodies, workdir)
        phases.append(sustained)
        print(f"{name}: sustained p99 {sustained.percentile('accepted', 99):.0f} ms", flush=True)
        loads.append(load_average())
        if soak:
            overload = open_loop(f"{name} overload 200%", 2 * rate, args.phase_s)
            before = refusals_within_50ms(url)
            phases.append(run_h2load(url, overload, bodies, workdir))
            after = refusals_within_50ms(url)
            overload.server_refusals = (after[0] - before[0], after[1] - before[1])
            loads.append(load_average())
            with MemorySampler(process.pid) as sampler:
                phases.append(run_h2load(url, open_loop(f"{name} soak 80%", 0.8 * rate, args.soak_s), bodies, workdir))
            memory = sampler.samples
            loads.append(load_average())
    finally:
        stop_server(process)
    return ready, phases, memory, loads


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def phase_row(phase: Phase) -> str:
    offered = "closed loop" if phase.offered_rps is None else fmt(phase.offered_rps)
    return (
        f"| {phase.name} | {offered} | {phase.clients} | {phase.seconds:.1f} | {phase.accepted_count} "
        f"| {fmt(phase.accepted_rps)} | {fmt(phase.percentile('accepted', 50), 0)} "
        f"| {fmt(phase.percentile('accepted', 99), 0)} | {phase.refused_count} "
        f"| {fmt(phase.percentile('refused', 50), 0)} | {fmt(phase.percentile('refused', 99), 0)} "
        f"| {phase.failures} |"
    )


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def report(
    args: argparse.Namespace,
    single: tuple[dict, list[Phase], list[tuple[float, float]], list[str]],
    ray_runs: list[tuple[int, tuple | str]],
) -> str:
    ready, phases, memory, loads = single
    by_name = {phase.name.split(" ", 1)[1]: phase for phase in phases}
    sustained, overload = by_name["sustained 80%"], by_name["overload 200%"]
    header = (
        "| phase | offered req/s | connections | s | accepted | accepted req/s | p50 ms | p99 ms "
        "| refused (503) | 503 p50 ms | 503 p99 ms | other errors |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines = [
        "# HTTP load test: admission control and Ray Serve replicas",
        "",
        f"Model `{args.model_dir}`; one text per request from {len(REVIEWS)} built-in reviews; server "
        f"max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms:g}, latency target "
        f"{args.latency_target_ms:g} ms ({'given' if args.max_queue else 'derived'} max_queue "
        f"{ready['max_queue']} texts), torch threads {args.threads or 'default'}; load from {h2load_version()} "
        "(one process per review, a new connection per request; closed loop for capacity, open loop otherwise) "
        f"on the same machine, loopback only. {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}.",
        *(["", f"Model note: {args.note}"] if args.note else []),
        "",
        f"**Noisy numbers**: the machine is shared (other jobs ran during the test; load averages 1/5/15 min "
        f"during the single-process phases: {'; '.join(loads)}), and the load generator shares the server's cores "
        "(h2load, written in C, takes little of them). Compare rows of this table with each other, not with "
        "other machines.",
        "",
        "## Single-process server (`badge serve`)",
        "",
        header,
        rule,
        *[phase_row(phase) for phase in phases],
        "",
    ]
    refused_p99 = overload.percentile("refused", 99)
    accepted_p99, sustained_p99 = overload.percentile("accepted", 99), sustained.percentile("accepted", 99)
    sustained_errors = sustained.failures + sustained.refused_count
    server_total, server_fast = overload.server_refusals or (math.nan, math.nan)
    lines += [
        f"- Sustained load at 80 % of capacity: {sustained_errors} errors (503 or other) in "
        f"{sustained.accepted_count} requests: {verdict(sustained_errors == 0)}.",
        f"- 2x overload, excess refused fast: 503 p99 {fmt(refused_p99, 0)} ms < 50 ms: "
        f"{verdict(overload.refused_count > 0 and refused_p99 < 50)} ({overload.refused_count} refused; "
        f"by the server's own clock {server_fast:.0f} of {server_total:.0f} 503s took at most 50 ms, the rest "
        "of the client's time is the loopback connection and the CPUs they share).",
        f"- 2x overload, accepted requests: p99 {fmt(accepted_p99, 0)} ms < 2 x sustained p99 "
        f"({fmt(2 * sustained_p99, 0)} ms): {verdict(accepted_p99 < 2 * sustained_p99)}; other errors "
        f"{overload.failures}{' ' + json.dumps(overload.failure_kinds) if overload.failure_kinds else ''}.",
    ]
    if memory:
        minute = [rss for t, rss in memory if t <= 60]
        last = [rss for t, rss in memory if t >= memory[-1][0] - 60]
        first, final = statistics.mean(minute), statistics.mean(last)
        lines.append(
            f"- Memory over the {args.soak_s:g} s soak (server RSS sampled every 5 s, {len(memory)} samples): "
            f"first minute {first:.0f} MiB, last minute {final:.0f} MiB, max {max(rss for _, rss in memory):.0f} "
            f"MiB; growth {final - first:+.1f} MiB ({100 * (final - first) / first:+.1f} %): "
            f"{verdict(abs(final - first) < 0.05 * first)} (flat = within 5 %). RSS at each minute (MiB): "
            + ", ".join(f"{rss:.0f}" for t, rss in memory if round(t) % 60 < 5)
            + "."
        )
    if ray_runs:
        lines += [
            "",
            "## Ray Serve (`badge serve --ray --replicas N`), same machine",
            "",
            f"Ray's HTTP proxy in front; each replica has {args.threads} torch thread(s) (and reserves as many "
            "CPUs), its own micro-batcher and derived queue bound. Same h2load phases as above.",
            "",
            header,
            rule,
        ]
        for _, outcome in ray_runs:
            if not isinstance(outcome, str):
                lines += [phase_row(phase) for phase in outcome[1]]
        lines.append("")
        for replicas, outcome in ray_runs:
            if isinstance(outcome, str):
                lines.append(f"- {replicas} replica(s): **the run failed**: {outcome}")
                continue
            ready_ray, _, _, ray_loads = outcome
            lines.append(
                f"- {replicas} replica(s): max_queue per replica {ready_ray['max_queue']}; load averages "
                f"{'; '.join(ray_loads)}."
            )
    lines += [
        "",
        "Command: `python benchmarks/loadtest.py "
        + " ".join(sys.argv[1:])
        + "` (percentiles over every answer's latency in h2load's per-request logs: from sending the request "
        "to the end of the answer).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--capacity-s", type=float, default=20.0, help="seconds of the closed-loop capacity phase")
    parser.add_argument("--phase-s", type=float, default=60.0, help="seconds of the sustained and overload phases")
    parser.add_argument("--soak-s", type=float, default=300.0, help="seconds of the memory soak")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--latency-target-ms", type=float, default=500.0)
    parser.add_argument("--max-queue", type=int, default=None, help="the server's queue bound (default: derived)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the single-process server and of each Ray replica"
    )
    parser.add_argument("--ray-replicas", type=int, nargs="*", default=[1, 2], help="Ray Serve runs (none: skip)")
    parser.add_argument("--startup-timeout-s", type=float, default=180.0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/LOADTEST.md"))
    parser.add_argument("--note", default="", help="a line about the model or the run, printed in the report")
    args = parser.parse_args()
    if min(args.capacity_s, args.phase_s, args.soak_s, args.max_batch_size) <= 0:
        parser.error("--capacity-s, --phase-s, --soak-s and --max-batch-size must be positive")
    if shutil.which("h2load") is None:
        parser.error("h2load is not installed: it comes with the nghttp2-client package (apt install nghttp2-client)")
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"{args.model_dir} is not a saved model folder (no config.json)")
    options = {
        "model_dir": str(args.model_dir),
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "latency_target_ms": args.latency_target_ms,
        "max_queue": args.max_queue,
    }
    with tempfile.TemporaryDirectory(prefix="badge-loadtest-") as folder:
        workdir = Path(folder)
        bodies = []
        for index, review in enumerate(REVIEWS):
            bodies.append(workdir / f"review-{index}.json")
            bodies[-1].write_text(json.dumps({"texts": review}), encoding="utf-8")
        single_options = {**options, "log_level": "warning", "threads": args.threads}
        single = measure_server("single", SERVER_CODE, single_options, args, bodies, workdir, soak=True)
        write_report(args, report(args, single, []))  # kept if a Ray run below breaks
        ray_runs = []
        for replicas in args.ray_replicas:
            ray_options = {**options, "replicas": replicas, "threads": args.threads}
            name = f"ray-{replicas}"
            try:
                outcome = measure_server(name, RAY_SERVER_CODE, ray_options, args, bodies, workdir, soak=False)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                print(f"{name} failed: {error}", file=sys.stderr, flush=True)
                outcome = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            ray_runs.append((replicas, outcome))
    write_report(args, report(args, single, ray_runs))


def write_report(args: argparse.Namespace, text: str) -> None:
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
