"""One description of the machine a benchmark ran on, stored with every result."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path


def cpu_name() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it."""
    fallback = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), fallback)
    except OSError:
        return fallback


def describe() -> dict:
    """CPU model, cores, memory, OS and the runtime versions that matter for the figures."""
    import numpy
    import onnxruntime
    import torch

    cpu = cpu_name()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    try:
        import ai_edge_litert

        from exporters.tflite_export import tensorflow

        tf = tensorflow()

        versions["ai_edge_litert"] = getattr(ai_edge_litert, "__version__", "?")
        versions["tensorflow"] = tf.__version__
    except ImportError:
        pass
    from exporters import peers

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1), "machine": platform.machine(),
            "os": platform.platform(), "versions": versions, "peer_versions": peers.versions()}


def cpu_slug(cpu: str) -> str:
    """A folder name for a CPU model: 'Intel(R) Xeon(R) Processor @ 2.80GHz' -> 'intel-xeon-2.80ghz'."""
    words = re.sub(r"\((r|tm)\)|\b(processor|cpu)\b|@", " ", cpu.lower())
    return re.sub(r"[^a-z0-9.]+", "-", words).strip("-") or "unknown"


def results_dir() -> Path:
    """benchmarks/results/CPU/: each machine's figures in a folder of their own (created)."""
    folder = Path(__file__).parent / "results" / cpu_slug(cpu_name())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_result(benchmark: str, **payload) -> Path:
    """benchmarks/results/CPU/BENCHMARK.json: the figures with the date, the command and this machine,
    written atomically. A run with other options than the stored file's (`--models mixnet_s` where the
    file has three models) goes beside it, dated, instead of replacing it; the path is printed."""
    from devices.atomic import write_atomic
    from mixnet_deploy import strict_json

    command = " ".join(sys.argv)
    now = datetime.datetime.now()
    result = {"benchmark": benchmark, "date": now.isoformat(timespec="seconds"), "command": command,
              "machine": describe(), **payload}
    path = results_dir() / f"{benchmark}.json"
    try:
        stored = json.loads(path.read_text()).get("command") if path.exists() else command
    except (OSError, ValueError, AttributeError):  # unreadable, or not an object: keep it, write beside it
        stored = None
    if not isinstance(stored, str) or stored.split()[1:] != sys.argv[1:]:  # the options, wherever it ran from
        path = path.with_name(f"{benchmark}_{now:%Y%m%d-%H%M%S}.json")
    write_atomic(path, (strict_json.dumps(result, indent=1) + "\n").encode())
    print(f"results: {path}", file=sys.stderr)
    return path
