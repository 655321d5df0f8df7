"""`mixdeploy bench`: latency of exported files on a device (this machine, adb or ssh) at several
thread counts, and parity of their on-device outputs with the PyTorch model on real photos."""
from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from exporters.inspect_file import exported_format, inspect_file
from mixnet_deploy.errors import DeviceError, DeviceTimeout, MixdeployError
from mixnet_deploy.models import reload
from mixnet_deploy.parity import DEPLOYED_TOLERANCE, compare, reference_outputs
from mixnet_deploy.preprocess import SAMPLE_IMAGES

from . import benchmark_model, runners
from .device_info import big_cores, cpu_mask, device_info, temperatures
from .runners import latency_stats
from .transport import ShellResult, Transport


class RunTimeout(DeviceTimeout):
    """A file's run on the device past --timeout (not a copy's own time limit)."""


@contextlib.contextmanager
def _run_limit() -> Iterator[None]:
    """A DeviceTimeout of the device commands inside becomes the file's RunTimeout."""
    try:
        yield
    except DeviceTimeout as exc:
        raise RunTimeout(str(exc), exc.seconds) from None


@dataclass
class Settings:
    """How to measure: thread counts, runs, cores, parity images, pauses and limits."""

    threads: list[int]
    runs: int = 50
    warmup: int = 5
    cpus: str | None = None  # a hex mask, "big", or None: big cores on a real Android device
    parity_dir: str | None = None
    parity_samples: int = 32
    runner: str = "python"  # or "benchmark_model"
    benchmark_binary: str | None = None
    cooldown: float | None = None  # seconds between models; None: 10 s on a real phone, else 0
    timeout: float = 900
    python: str | None = None  # the device's Python; None: python3 (this Python on the local device)

    def __post_init__(self) -> None:
        if self.cpus not in (None, "big") and not re.fullmatch(r"(0[xX])?[0-9a-fA-F]+", self.cpus.strip()):
            raise MixdeployError(f"--cpus {self.cpus}: give a hex core mask such as f0, or big")


@dataclass
class Prepared:
    """A file ready for a device: its facts, the parity inputs and the float64 reference outputs."""

    path: Path
    report: dict
    images: np.ndarray
    reference: np.ndarray


def described(file: str, meta: dict | None = None) -> dict:
    """inspect_file's report of an exported file with the metadata bench needs (the file's own, or
    `meta` for a peer's file); a MixdeployError for a file mixdeploy did not describe."""
    report = inspect_file(file)
    report["metadata"] = meta = meta or report.get("metadata", {})
    if "mixdeploy.model" not in meta:
        raise MixdeployError(f"{file} carries no mixdeploy metadata; bench files written by mixdeploy export/quantize")
    return report


def prepare(file: str, report: dict, parity_dir: str | None, samples: int, references: dict | None = None) -> Prepared:
    """Preprocess the parity photos with the file's model's own config and compute PyTorch's outputs
    (shared through `references` by files of the same model)."""
    from quantization.calibration import MIN_IMAGES, load_folder

    meta = report["metadata"]
    key = json.dumps([meta["mixdeploy.weights"], meta.get("mixdeploy.weights_sha256"), meta["mixdeploy.model"],
                      meta["mixdeploy.preprocess"], meta.get("mixdeploy.code"), meta.get("mixdeploy.calibrated_at")])
    references = {} if references is None else references
    if key not in references:
        loaded = reload(meta)
        images = load_folder(parity_dir or SAMPLE_IMAGES, loaded.preprocess, limit=samples,
                             minimum=min(samples, MIN_IMAGES)).images
        references[key] = images.numpy(), reference_outputs(loaded.module, images)
    images, reference = references[key]
    return Prepared(Path(file), report, images, reference)


def core_mask(cpus: str | None, info: dict, threads: int = 1) -> str | None:
    """taskset mask for --cpus: "big" -> the fastest cores, at least `threads` of them when the device
    has them; None -> the same on a real Android phone. A mask of fewer cores than `threads` is refused:
    the threads would share cores and time each other."""
    android = info["os"].startswith("Android") and not info["emulated"]
    if cpus == "big" or (cpus is None and android):
        return cpu_mask(big_cores(info["cores"], threads))
    if cpus is None:
        return None
    mask = int(cpus, 16)
    if mask <= 0 or mask >= 1 << len(info["cores"]):
        raise MixdeployError(f"--cpus {cpus}: {'selects no core' if mask <= 0 else 'names a core the device lacks'}; "
                             f"the device has cores 0-{len(info['cores']) - 1} (mask {(1 << len(info['cores'])) - 1:x} "
                             "for all of them)")
    if mask.bit_count() < min(threads, len(info["cores"])):
        raise MixdeployError(f"--cpus {cpus} has {mask.bit_count()} core(s) for {threads} threads: they would share "
                             "cores; give a mask of as many cores as the largest --threads, or big")
    return format(mask, "x")


class Session:
    """One device for one bench call: what it is, the runner pushed once, a work folder removed at the end."""

    def __init__(self, device: Transport, settings: Settings, host: Path) -> None:
        self.device, self.settings, self.host = device, settings, host
        self.info = device_info(device)
        # each thread count on its own fastest cores (1 thread on the prime core, not beside little ones);
        # the process on all of them
        self.masks = {t: core_mask(settings.cpus, self.info, t) for t in settings.threads}
        self.mask = self.masks[max(settings.threads)]
        self.prefix = ["taskset", self.mask] if self.mask else []
        self.python = settings.python or device.python
        self.binary: str | None = None
        self.script = f"{device.workdir}/runner.py"
        if settings.runner == "python":  # benchmark_model needs no Python there
            device.push(runners.__file__, self.script)

    def check_python(self, fmt: str) -> str:
        """The device's python3 must import numpy and the file's runtime; the runtime and its version
        (asked once per format: a Python start-up takes seconds on a slow or emulated device)."""
        key = (self.python, fmt)  # kept on the device's transport: a check before the model is built counts
        if key not in self.device.runtimes:
            module = "onnxruntime" if fmt == "onnx" else "ai_edge_litert"
            code = f"import numpy, {module} as m; print(m.__name__, getattr(m, '__version__', '?'))"
            probe = self.device.shell([self.python, "-c", code], timeout=300, check=False)
            if probe.code == 127:
                raise DeviceError(f"{self.device.name} has no {self.python}: pass --python PATH of its Python "
                                  "(bench can also use --runner benchmark_model)")
            if probe.code != 0:
                said = (probe.stderr or probe.stdout).strip().splitlines()
                raise DeviceError(f"{self.python} on {self.device.name} cannot import numpy and {module}"
                                  + (f" ({said[-1].strip()})" if said else "") + ": pip install them there or pass "
                                  "--python PATH of a Python that has them (bench can also use --runner "
                                  "benchmark_model)")
            self.device.runtimes[key] = probe.stdout.strip()
        return self.device.runtimes[key]

    def run_python(self, item: Prepared) -> dict:
        """Push the model and the parity inputs, run the runner, pull the outputs."""
        s, work = self.settings, self.device.workdir
        model = f"{work}/model.{item.report['format']}"
        self.device.push(item.path, model)
        np.save(self.host / "inputs.npy", item.images.astype(np.float32))
        self.device.push(self.host / "inputs.npy", f"{work}/inputs.npy")
        argv = [*self.prefix, self.python, self.script, "bench", model, f"{work}/inputs.npy", f"{work}/outputs.npy",
                "--threads", ",".join(map(str, s.threads)), "--runs", str(s.runs), "--warmup", str(s.warmup)]
        if self.mask:
            argv += ["--affinity", ",".join(f"{t}={mask}" for t, mask in self.masks.items())]
        with _run_limit():
            done = self.device.shell(argv, timeout=s.timeout, check=False)
        measured = runner_result(done, f"the runner failed on {self.device.name} for {item.path.name}")
        self.device.pull(f"{work}/outputs.npy", self.host / "outputs.npy")
        measured["outputs"] = np.load(self.host / "outputs.npy")
        measured["latency_ms"] = {t: latency_stats(raw) for t, raw in measured["latency_ms"].items()}
        return measured

    def ready(self, formats: set[str]) -> None:
        """What runs the files is on the device: python3 with each format's runtime, or benchmark_model."""
        if self.settings.runner == "python":
            for fmt in sorted(formats):
                self.check_python(fmt)
        else:
            binary = benchmark_model.find_binary(self.settings.benchmark_binary, self.info["abi"],
                                                 self.info["os"].startswith("Android"))
            self.binary = benchmark_model.install(self.device, binary)

    def run_benchmark_model(self, item: Prepared) -> dict:
        """LiteRT's benchmark_model: one timed run per thread count, then one run per parity image fed
        through --input_layer_value_files, its --output_filepath pulled back; all within --timeout."""
        s, work = self.settings, self.device.workdir
        deadline = time.monotonic() + s.timeout

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunTimeout(f"{item.path.name}: past --timeout {s.timeout:g} s", s.timeout)
            return remaining

        assert self.binary is not None, "ready() installs benchmark_model first"
        model = f"{work}/model.tflite"
        self.device.push(item.path, model)
        latency, first = {}, None
        for t in s.threads:
            with _run_limit():
                parsed = benchmark_model.run(self.device, self.binary, model, t, s.runs, s.warmup, self.masks[t],
                                             timeout=left())
            first = first or parsed
            stats = {"p90": None, "p99": None, **parsed["latency_ms"], "runs": parsed["runs"], "raw": []}
            if stats["median"] is None:  # older builds print no median: the mean stands in, and says so
                stats.update(median=stats["mean"], median_is_mean=True)
            latency[str(t)] = stats
        host = runners.LiteRtRunner(item.path)
        name, shape = host.input["name"], tuple(int(d) for d in host.input["shape"])
        outputs = []
        for x in host.feed(item.images):
            (self.host / "input.bin").write_bytes(runners.quantize(x[None], host.input).tobytes())
            self.device.push(self.host / "input.bin", f"{work}/input.bin")
            self.device.shell(["rm", "-f", f"{work}/output.bin"])  # a run writing none must not pass the last one's
            with _run_limit():
                benchmark_model.run(self.device, self.binary, model, s.threads[0], 1, 0, self.masks[s.threads[0]],
                                    {name: f"{work}/input.bin"}, {name: shape}, f"{work}/output.bin", timeout=left())
            self.device.pull(f"{work}/output.bin", self.host / "output.bin")
            raw = benchmark_model.read_outputs((self.host / "output.bin").read_bytes(),
                                               [(tuple(host.output["shape"]), host.output["dtype"])])[0]
            outputs.append(runners.dequantize(raw, host.output))
        memory, delegated = first["memory_mb"], first["delegated_nodes"]
        return {"runtime": "benchmark_model", "init_ms": first["init_ms"],
                "delegation": None if delegated is None else {"nodes": first["total_nodes"], "delegated": delegated},
                "first_inference_ms": first["first_inference_ms"], "latency_ms": latency,
                "peak_memory_mb": memory["peak"] or memory["overall"], "model_memory_mb": memory["overall"],
                "outputs": np.concatenate(outputs)}

    def measure(self, item: Prepared) -> dict:
        """One file: temperatures around the run, timings, on-device parity."""
        s = self.settings
        temps_before = temperatures(self.device)
        try:
            measured = self.run_benchmark_model(item) if s.runner == "benchmark_model" else self.run_python(item)
        except RunTimeout:
            raise DeviceTimeout(f"{item.path.name} did not finish on {self.device.name} within --timeout {s.timeout:g} s "
                                f"({s.runs} runs at {','.join(map(str, s.threads))} thread(s)): raise --timeout or "
                                "lower --runs", s.timeout) from None
        report = item.report
        parity = compare(item.reference, measured["outputs"], **DEPLOYED_TOLERANCE[report["precision"]])
        latency = measured["latency_ms"]
        meta = report["metadata"]
        return {"file": str(item.path), "model": meta["mixdeploy.model"], "weights": meta["mixdeploy.weights"],
                "format": report["format"], "precision": report["precision"], "size_bytes": report["size_bytes"],
                "input_shape": report["inputs"][0]["shape"], "runner": s.runner, "runtime": measured["runtime"],
                "cpus": self.mask, "cpus_by_threads": {str(t): m for t, m in self.masks.items()} if self.mask else None,
                "cores_run_on": measured.get("cores"),  # per thread count, as the runner saw them (python runner)
                "delegation": measured.get("delegation"),  # what XNNPACK took on the device (.tflite)
                "init_ms": measured["init_ms"], "first_inference_ms": measured["first_inference_ms"],
                "peak_memory_mb": measured["peak_memory_mb"], "model_memory_mb": measured["model_memory_mb"],
                "latency_ms": latency[str(s.threads[0])], "latency_by_threads": latency,
                "temps_before": temps_before, "temps_after": temperatures(self.device), "parity": parity.to_dict()}

    def cooldown(self) -> float:
        """Seconds to rest between models: a real phone throttles within seconds of full load."""
        if self.settings.cooldown is not None:
            return self.settings.cooldown
        return 10.0 if self.info["os"].startswith("Android") and not self.info["emulated"] else 0.0


def runner_result(done: ShellResult, failure: str) -> dict:
    """The JSON line the runner prints last; else a DeviceError `failure (exit N): what it said` (a shell
    that merges stderr and exits 0, such as adb before Android 7, prints no JSON)."""
    lines = done.stdout.strip().splitlines()
    try:
        if done.code == 0 and lines and isinstance(result := json.loads(lines[-1]), dict):
            return result
    except ValueError:
        pass
    detail = (done.stderr or done.stdout).strip().splitlines()
    raise DeviceError(f"{failure} (exit {done.code})" + (f": {detail[-1].strip()[:200]}" if detail else ""))


def check_files(files: list[str], runner: str) -> dict[str, str]:
    """Each file's format, once every file is checked to exist as .onnx/.tflite and suit `runner`."""
    formats = {file: exported_format(file) for file in files}
    not_tflite = [Path(file).name for file, fmt in formats.items() if fmt != "tflite"]
    if runner == "benchmark_model" and not_tflite:
        raise MixdeployError(f"--runner benchmark_model runs .tflite files; bench {not_tflite[0]} with --runner python")
    return formats


def check_runner(device: Transport, settings: Settings, formats: set[str],
                 step: Callable[[str], None] = lambda _: None) -> None:
    """The device reached and its runner ready for `formats`, before minutes of other work (exports)."""
    with device, tempfile.TemporaryDirectory(prefix="mixdeploy-bench-") as host:
        device.reserve(step)
        Session(device, settings, Path(host)).ready(formats)


def bench(files: list[str], device: Transport, settings: Settings,
          step: Callable[[str], None] = lambda _: None, metadata: dict[str, dict] | None = None) -> dict:
    """Per file: precision, size, init and first-inference time, peak memory, latency stats per
    thread count (every raw timing kept), temperatures, and parity with the PyTorch model; the
    device's facts alongside. `metadata` gives the model of files mixdeploy did not write (peers').
    The device's work folder is removed whatever happens."""
    formats = check_files(files, settings.runner)
    with device, tempfile.TemporaryDirectory(prefix="mixdeploy-bench-") as host:
        device.reserve(step)
        # the device and its runner before reading the files (TensorFlow loads in seconds) and the
        # PyTorch reference (minutes for a large model): a missing runtime or binary fails at once
        session = Session(device, settings, Path(host))
        session.ready(set(formats.values()))
        prepared, references = [], {}
        for file in files:
            report = described(file, (metadata or {}).get(str(file)))
            step(f"{Path(file).name}: PyTorch reference on real photos")
            prepared.append(prepare(file, report, settings.parity_dir, settings.parity_samples, references))
        results = []
        for i, item in enumerate(prepared):
            if i and session.cooldown():
                step(f"cooling down {session.cooldown():g} s")
                time.sleep(session.cooldown())
            step(f"{item.path.name}: {settings.runs} runs at {','.join(map(str, settings.threads))} thread(s) "
                 f"on {device.name}" + (" (emulated: slow)" if session.info["emulated"] else ""))
            results.append(session.measure(item))
    return {"device": session.info, "settings": {"threads": settings.threads, "runs": settings.runs,
                                                 "warmup": settings.warmup, "cpus": session.mask,
                                                 "runner": settings.runner}, "results": results}
