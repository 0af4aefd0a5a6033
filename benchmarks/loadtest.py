"""HTTP load test: the model's early exits against all layers, each behind a real server on loopback.

    python benchmarks/loadtest.py runs/quickstart/best --requests 500 --concurrency 16

Starts two server processes (`badge.serve.run_server`) on free 127.0.0.1 ports: one runs the model's
default exit policy, the other is forced to run every layer (`ExitPolicy("full")`). Each server in turn
gets the same bounded stream of requests (at most --requests, for at most --duration-s) from
--concurrency clients (httpx.AsyncClient). Texts come from --texts-file (one per line) or a built-in
list of short reviews. Prints and writes a Markdown table (default benchmarks/LOADTEST.md):
throughput, p50/p99 latency, errors, mean exit layer, and the early-exit / all-layers throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"
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
# Runs in each server process: options arrive as one JSON argument.
SERVER_CODE = """
import json, sys
from badge.rules import ExitPolicy
from badge.serve import run_server
options = json.loads(sys.argv[1])
forced = options.pop("force_policy")
run_server(options.pop("model_dir"), force_policy=ExitPolicy.from_dict(forced) if forced else None, **options)
"""


@dataclass
class LoadResult:
    """What one server did under load: successful request latencies, exit layers, errors and wall time."""

    server: str
    policy: str
    latencies: list[float] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def texts_per_s(self) -> float:
        return len(self.exit_layers) / self.seconds if self.seconds else 0.0


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(
    model_dir: Path, port: int, force_policy: dict | None, max_batch_size: int, max_wait_ms: float
) -> subprocess.Popen:
    """Start `run_server` in a child process on 127.0.0.1:`port`."""
    options = {
        "model_dir": str(model_dir),
        "host": HOST,
        "port": port,
        "log_level": "warning",
        "force_policy": force_policy,
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
    }
    return subprocess.Popen([sys.executable, "-c", SERVER_CODE, json.dumps(options)])


def wait_until_ready(process: subprocess.Popen, url: str, timeout_s: float) -> dict:
    """Poll /healthz until the server answers; return its /v1/model description."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, trust_env=False, timeout=5) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server for {url} exited with code {process.returncode} before it was ready")
            try:
                if http.get("/healthz").status_code == 200:
                    return http.get("/v1/model").json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the server for {url} was not ready within {timeout_s} s")


async def load(
    url: str, result: LoadResult, texts: list[str], requests: int, concurrency: int, duration_s: float, per_request: int
) -> None:
    """Send up to `requests` requests from `concurrency` clients for up to `duration_s`; fill `result`."""
    sent = 0

    async def client(http: httpx.AsyncClient, deadline: float) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            first = sent * per_request
            sent += 1
            body = {"texts": [texts[(first + i) % len(texts)] for i in range(per_request)]}
            start = time.perf_counter()
            try:
                response = await http.post("/v1/classify", json=body)
            except httpx.HTTPError:
                result.errors += 1
                continue
            if response.status_code != 200:
                result.errors += 1
                continue
            result.latencies.append(time.perf_counter() - start)
            result.exit_layers.extend(answer["exit_layer"] for answer in response.json()["results"])

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, start + duration_s) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start


def report(results: list[LoadResult], args: argparse.Namespace) -> str:
    """The Markdown report: settings, one table row per server, and the throughput ratio."""
    lines = [
        "# HTTP load test: early exits against all layers",
        "",
        f"Model `{args.model_dir}`; {args.requests} requests at most ({args.duration_s:g} s at most) per server, "
        f"{args.concurrency} concurrent clients, {args.texts_per_request} text(s) per request; server "
        f"max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms:g}; {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}. Loopback only.",
        "",
        "| server | exit policy | requests | errors | req/s | texts/s | p50 ms | p99 ms | mean exit layer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        mean_layer = sum(result.exit_layers) / len(result.exit_layers) if result.exit_layers else math.nan
        lines.append(
            f"| {result.server} | `{result.policy}` | {len(result.latencies)} | {result.errors} "
            f"| {result.requests_per_s:.1f} | {result.texts_per_s:.1f} "
            f"| {1000 * percentile(result.latencies, 0.5):.1f} | {1000 * percentile(result.latencies, 0.99):.1f} "
            f"| {mean_layer:.2f} |"
        )
    early, full = results
    ratio = early.requests_per_s / full.requests_per_s if full.requests_per_s else math.nan
    lines += ["", f"Throughput early-exit / all-layers: **{ratio:.2f}x**", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--requests", type=int, default=200, help="most requests sent to each server")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    parser.add_argument("--duration-s", type=float, default=60.0, help="most seconds of load per server")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--texts-file", type=Path, default=None, help="one text per line (default: built-in reviews)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests sent to each server first")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--startup-timeout-s", type=float, default=120.0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/LOADTEST.md"))
    args = parser.parse_args()
    if min(args.requests, args.concurrency, args.texts_per_request) < 1 or args.duration_s <= 0:
        parser.error("--requests, --concurrency, --texts-per-request and --duration-s must be positive")
    if args.texts_file is not None:
        texts = [line.strip() for line in args.texts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            parser.error(f"{args.texts_file} holds no text")
    else:
        texts = REVIEWS

    servers = {"early exit": None, "all layers": {"rule": "full"}}
    processes, results = [], []
    try:
        urls = {}
        for name, forced in servers.items():  # both load their model at the same time
            port = free_port()
            processes.append(start_server(args.model_dir, port, forced, args.max_batch_size, args.max_wait_ms))
            urls[name] = f"http://{HOST}:{port}"
        # Both must be up before timing starts: a server still loading would steal CPU from the other.
        infos = [
            wait_until_ready(process, url, args.startup_timeout_s)
            for url, process in zip(urls.values(), processes, strict=True)
        ]
        for (name, url), info in zip(urls.items(), infos, strict=True):
            warmup = LoadResult(name, info["default_policy"])
            asyncio.run(load(url, warmup, texts, args.warmup, 1, args.duration_s, args.texts_per_request))
            result = LoadResult(name, info["default_policy"])
            asyncio.run(
                load(url, result, texts, args.requests, args.concurrency, args.duration_s, args.texts_per_request)
            )
            results.append(result)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    text = report(results, args)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
