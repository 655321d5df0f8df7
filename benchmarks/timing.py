"""Interleaved latency measurement: every runner in turn, several rounds, so drift hits all alike."""
from __future__ import annotations

import argparse

from devices.runners import latency_stats


def interleaved(runners: dict, x: dict, rounds: int = 5, runs: int = 40, warmup: int = 5) -> dict[str, dict]:
    """runners: name -> object with .time(x, runs, warmup) -> list of ms; x: name -> input array."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name] += runner.time(x[name], runs=runs, warmup=warmup)
    return {name: latency_stats(t) for name, t in times.items()}


def arguments(doc: str, models: str = "mixnet_s,mixnet_m,mixnet_l", threads: str = "1,2") -> argparse.Namespace:
    """The options every benchmark script takes: --models, --threads, --rounds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=models)
    parser.add_argument("--threads", default=threads)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()
