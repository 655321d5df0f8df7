"""Runtimes behind one small interface: load a file, run it, time it.

This file needs only the standard library and numpy (plus the runtime itself), because it is also
the runner pushed to devices: `python3 runners.py MODEL INPUTS.npy OUTPUTS.npy --threads 1,2`."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence what native libraries print to file descriptor 2 (TF converter logs, the XNNPACK banner)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


BATCH = 64  # images per ONNX Runtime call for a file with a free batch dimension


def _timed(call, runs: int, warmup: int) -> list[float]:
    """Latencies in ms of `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency_stats(times: list[float]) -> dict:
    """Median, mean, min, p90, p99, std of a list of ms, with the count and the raw list."""
    a = np.asarray(times)
    return {"median": float(np.median(a)), "mean": float(a.mean()), "min": float(a.min()),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "std": float(a.std()),
            "runs": len(a), "raw": [round(float(t), 4) for t in a]}


def file_format(path: str | Path) -> str | None:
    """"onnx" or "tflite" by the file's suffix, in any letter case; None for any other file."""
    fmt = Path(path).suffix[1:].lower()
    return fmt if fmt in ("onnx", "tflite") else None


def runner_for(path: str | Path, threads: int = 1) -> "OrtRunner | LiteRtRunner":
    """The runtime for a file: ONNX Runtime for .onnx, LiteRT for .tflite."""
    return OrtRunner(path, threads) if file_format(path) == "onnx" else LiteRtRunner(path, threads)


def layout_of(shape: Sequence, chw: Sequence[int]) -> str:
    """nhwc when a model input of `shape` takes images of `chw` (C, H, W) as (N, H, W, C), else nchw."""
    c, h, w = chw
    return "nhwc" if list(shape[1:]) == [h, w, c] != [c, h, w] else "nchw"


def in_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """An NCHW batch in `layout` (nchw or nhwc)."""
    return x.transpose(0, 2, 3, 1) if layout == "nhwc" else x


def feed_for(x: np.ndarray, shape: Sequence) -> np.ndarray:
    """An NCHW batch in the layout of a model input of `shape`."""
    return in_layout(x, layout_of(shape, x.shape[1:]))


class OrtRunner:
    """ONNX Runtime on the CPU with a fixed number of intra-op threads."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The input's shape (batch 1 when free)."""
        return tuple(d if isinstance(d, int) else 1 for d in self.input.shape)

    def feed(self, x: np.ndarray) -> np.ndarray:
        """An NCHW batch as this model takes it."""
        return feed_for(x, self.input.shape)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs of the first output for a batch in the model's own layout (a free batch dimension
        takes at most BATCH at a time: a thousand images at once would take gigabytes)."""
        step = 1 if self.input.shape[0] == 1 else BATCH
        if len(x) > step:
            return np.concatenate([self.run(x[i:i + step]) for i in range(0, len(x), step)])
        return self.session.run(None, {self.input.name: x.astype(np.float32, copy=False)})[0]

    def time(self, x: np.ndarray, runs: int = 50, warmup: int = 5) -> list[float]:
        """Latencies in ms of `runs` single runs after `warmup` runs (the input converted once, before)."""
        feed = {self.input.name: np.ascontiguousarray(x, dtype=np.float32)}
        return _timed(lambda: self.session.run(None, feed), runs, warmup)


class LiteRtRunner:
    """The LiteRT interpreter with its default XNNPACK delegate and a fixed number of threads."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        with quiet_native_stderr():
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The input's shape in the model's own layout."""
        return tuple(int(d) for d in self.input["shape"])

    def feed(self, x: np.ndarray) -> np.ndarray:
        """An NCHW batch as this model takes it."""
        return feed_for(x, self.input["shape"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs for a batch in the model's own layout and type (quantized io is (de)quantized here)."""
        outs = []
        for sample in x:
            self.interpreter.set_tensor(self.input["index"], quantize(sample[None], self.input))
            self.interpreter.invoke()
            outs.append(dequantize(self.interpreter.get_tensor(self.output["index"]), self.output))
        return np.concatenate(outs)

    def time(self, x: np.ndarray, runs: int = 50, warmup: int = 5) -> list[float]:
        """Latencies in ms of `runs` invocations after `warmup`, on the first sample of `x`."""
        self.interpreter.set_tensor(self.input["index"], quantize(x[:1], self.input))
        return _timed(self.interpreter.invoke, runs, warmup)

    def delegation(self) -> dict:
        """Ops by type and how many of them the XNNPACK delegate took here (traced back from its DELEGATE
        nodes' outputs to their inputs), in how many partitions, and the ops by type it left."""
        native = self.interpreter._interpreter
        nodes = [(native.NodeName(i), set(native.NodeInputs(i)), set(native.NodeOutputs(i)))
                 for i in range(native.NumNodes())]
        originals = [n for n in nodes if n[0] != "DELEGATE"]
        producer = {t: i for i, (_, _, outs) in enumerate(originals) for t in outs}
        taken: set[int] = set()
        for _, inputs, outputs in (n for n in nodes if n[0] == "DELEGATE"):
            stack = [producer[t] for t in outputs if t in producer]
            while stack:
                i = stack.pop()
                if i in taken:
                    continue
                taken.add(i)
                stack += [producer[t] for t in originals[i][1] if t in producer and t not in inputs]
        left = Counter(originals[i][0] for i in range(len(originals)) if i not in taken)
        return {"ops": dict(Counter(n[0] for n in originals).most_common()), "nodes": len(originals),
                "delegated": len(taken), "partitions": len(nodes) - len(originals), "not_delegated": dict(left)}


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """A float input as the tensor `detail` (LiteRT's input details) takes it."""
    if detail["dtype"] == np.float32:
        return x.astype(np.float32)
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])


def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    """An output tensor back to float."""
    if detail["dtype"] == np.float32:
        return y.astype(np.float32)
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale


def time_files(paths: list[str], threads: int = 1, runs: int = 20, warmup: int = 3, rounds: int = 3) -> dict[str, float]:
    """The fastest run's ms of each file on a random input of its own shape; files take turns within
    each round, so a slow moment of the device hits all of them alike. The fastest run is the
    steadiest figure where other work or throttling slows runs down (mixnet_m int8 on a noisy
    2-vCPU VM, 6 repeats: 3.3 % spread, against 8.5 % for the best round's median)."""
    runners = {p: runner_for(p, threads) for p in paths}
    rng = np.random.default_rng(0)
    inputs = {p: rng.standard_normal(r.shape).astype(np.float32) for p, r in runners.items()}
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for p, r in runners.items():
            best[p] = min(best[p], *r.time(inputs[p], runs=runs, warmup=warmup))
    return best


def runtime_version(model: str) -> str:
    """The runtime that runs `model` here, with its version."""
    if file_format(model) == "onnx":
        import onnxruntime as runtime
    else:
        import ai_edge_litert as runtime
    return f"{runtime.__name__.replace('_', '-')} {getattr(runtime, '__version__', '?')}"


def _bench(args) -> dict:
    import resource

    threads = [int(t) for t in args.threads.split(",")]
    # thread count -> the cores it runs on (hex masks); set before its runtime makes its thread pool
    affinity = {int(t): {c for c in range(64) if int(m, 16) >> c & 1}
                for t, m in (item.split("=") for item in args.affinity.split(","))} if args.affinity else {}
    pin = (lambda t: os.sched_setaffinity(0, affinity[t])) if affinity and hasattr(os, "sched_setaffinity") else None
    cores = {}
    x = np.load(args.inputs)
    version = runtime_version(args.model)
    kb = 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KiB elsewhere
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb
    if pin:
        pin(threads[0])
    start = time.perf_counter()
    runner = runner_for(args.model, threads[0])
    init_ms = (time.perf_counter() - start) * 1e3
    feed = runner.feed(x)
    start = time.perf_counter()
    runner.run(feed[:1])
    first_ms = (time.perf_counter() - start) * 1e3
    latency = {}
    for t in threads:
        if pin:
            pin(t)
        timed = runner if t == threads[0] else runner_for(args.model, t)
        latency[str(t)] = timed.time(feed[:1], runs=args.runs, warmup=args.warmup)
        cores[str(t)] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        if t == threads[0]:  # the peak of one model on one image: not with other thread counts' runners, nor the batch
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb
    if pin:
        pin(threads[0])  # the outputs' runner: its own thread count's cores
    np.save(args.outputs, runner.run(feed))
    return {"runtime": version, "python": sys.version.split()[0], "init_ms": init_ms, "first_inference_ms": first_ms,
            "latency_ms": latency, "peak_memory_mb": peak_kb / 1024, "model_memory_mb": (peak_kb - baseline_kb) / 1024,
            "cores": cores, "delegation": runner.delegation() if isinstance(runner, LiteRtRunner) else None}


def main(argv: list[str] | None = None) -> None:
    """On a device, printing one JSON line:
    `bench MODEL INPUTS.npy OUTPUTS.npy`: run MODEL on an NCHW float32 batch, save its outputs, time
    it per thread count (raw latencies, monotonic clock), with init, first inference and peak memory;
    `time FILE...`: the fastest run's ms of each file (single-layer probes when tuning a plan)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench")
    bench.add_argument("model")
    bench.add_argument("inputs")
    bench.add_argument("outputs")
    bench.add_argument("--threads", default="1")
    bench.add_argument("--affinity", help="THREADS=HEXMASK,...: the cores each thread count runs on")
    timing = commands.add_parser("time")
    timing.add_argument("files", nargs="+")
    timing.add_argument("--threads", type=int, default=1)
    timing.add_argument("--rounds", type=int, default=3)
    for sub, runs, warmup in ((bench, 50, 5), (timing, 20, 3)):
        sub.add_argument("--runs", type=int, default=runs)
        sub.add_argument("--warmup", type=int, default=warmup)
    args = parser.parse_args(argv)
    if args.command == "bench":
        print(json.dumps(_bench(args)))
    else:
        print(json.dumps({"runtime": runtime_version(args.files[0]),
                          "ms": time_files(args.files, args.threads, args.runs, args.warmup, args.rounds)}))


if __name__ == "__main__":
    main()
