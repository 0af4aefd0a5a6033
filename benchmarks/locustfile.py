"""Locust users for `benchmarks/loadtest.py`: each posts one review per request to /v1/classify.

Settings come from the environment (loadtest.py sets them):
    LOADTEST_RATE_PER_USER  requests per second of each user; 0 = send again as soon as answered
    LOADTEST_TEXTS          a file with one text per line

Answers are counted under two names so their latencies stay apart: `accepted` (200) and `refused`
(503, the server's admission control). Anything else is a failure of `accepted`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, task

RATE_PER_USER = float(os.environ.get("LOADTEST_RATE_PER_USER", "0"))
TEXTS = [line for line in Path(os.environ["LOADTEST_TEXTS"]).read_text(encoding="utf-8").splitlines() if line]
_next_text = itertools.cycle(TEXTS)


class Classifier(FastHttpUser):
    wait_time = constant_throughput(RATE_PER_USER) if RATE_PER_USER > 0 else constant(0)
    network_timeout = 60.0
    connection_timeout = 10.0

    @task
    def classify(self) -> None:
        body = {"texts": next(_next_text)}
        with self.client.post("/v1/classify", json=body, name="accepted", catch_response=True) as response:
            if response.status_code == 200:
                response.success()
            elif response.status_code == 503:
                response.request_meta["name"] = "refused"
                response.success()
            else:
                response.failure(f"status {response.status_code}")
