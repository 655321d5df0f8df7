"""LiteRT's `benchmark_model` as an on-device runner: the command line, one run through a
transport, its printed timings normalized to milliseconds and MB, and its output file split
back into arrays.

Two output formats exist: the TFLite-interpreter tool (`count=.. first=..` stat lines and
`Inference timings in us: ...`) and the newer CompiledModel tool, which prints the same stat
lines plus a `========== BENCHMARK RESULTS ==========` block in ms. Where both print a value,
the more precise one is kept (integer microseconds over `%.2f` ms)."""
from __future__ import annotations

import contextlib
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from mixnet_deploy.errors import DeviceError, MixdeployError

from .transport import Transport

PREBUILT = ("LiteRT publishes prebuilt benchmark_model binaries for android_arm64, linux_arm64, "
            "linux_x86_64 — download one and pass its path")
CACHE = Path("~/.cache/mixdeploy/benchmark_model")
ABI_MACHINES = {"arm64-v8a": 183, "aarch64": 183, "armeabi-v7a": 40, "x86_64": 62, "x86": 3}  # ELF e_machine
MACHINES = {183: "arm64", 40: "32-bit arm", 62: "x86_64", 3: "x86"}

# a line's message without its "INFO: " / "VERBOSE: " level and LiteRT's "[file.h:81] " origin
_PREFIX = re.compile(r"^(?:(?:INFO|WARNING|ERROR|VERBOSE|DEBUG): )?(?:\[[^\]]*:\d+\] )?")
_NUM = r"(-?nan|-?inf|[-+\d.eE]+)"  # glibc prints a NaN as -nan: the words first
_CLASSIC = {
    "session_ms": re.compile(rf"^Initialized session in {_NUM}ms"),
    "timings_us": re.compile(rf"^Inference timings in us: Init: {_NUM}, First inference: {_NUM}, "
                             rf"Warmup \(avg\): {_NUM}, Inference \(avg\): {_NUM}"),
    "memory": re.compile(rf"^(?:Memory footprint delta from the start of the tool|Peak memory footprint) "
                         rf"\(MB\): init={_NUM} overall={_NUM}"),
    "peak": re.compile(rf"^Overall peak memory footprint \(MB\) via periodic monitoring: {_NUM}"),
}
_BLOCK = {
    "init": re.compile(rf"^Model initialization:\s+{_NUM} ms"),
    "first": re.compile(rf"^(?:Warmup \(first\)|First inference):\s+{_NUM} ms"),
    "warmup": re.compile(rf"^Warmup \(avg\):\s+{_NUM} ms \((\d+) runs\)"),
    "mean": re.compile(rf"^Inference \(avg\):\s+{_NUM} ms \((\d+) runs\)"),
    "min": re.compile(rf"^Inference \(min\):\s+{_NUM}"),
    "max": re.compile(rf"^Inference \(max\):\s+{_NUM}"),
    "std": re.compile(rf"^Inference \(std\):\s+{_NUM}"),
    "mem_init": re.compile(rf"^Init footprint:\s+{_NUM} MB"),
    "mem_overall": re.compile(rf"^Overall footprint:\s+{_NUM} MB"),
    "mem_peak": re.compile(rf"^Peak memory:\s+{_NUM} MB"),
}
_HEADER = re.compile(r"^=+ BENCHMARK RESULTS =+$")
_STAT = re.compile(r"^count=\d+")
_FIELD = re.compile(rf"(\w+)={_NUM}")
_REPLACING = re.compile(r"Replacing (\d+) (?:out of (\d+) )?node\(s\) with delegate .*?"
                        r"(?:for subgraph (\d+))?\.?$")
_FATAL = re.compile(r"Segmentation fault|Aborted|Bus error|Illegal instruction|Killed|core dumped|"
                    r"CANNOT LINK EXECUTABLE|not executable|Exec format error")
_FAILURE = re.compile(r"fail|error|not found|no such file|cannot|unable", re.IGNORECASE)


def _num(text: str) -> float | None:
    value = float(text)
    return None if math.isnan(value) else value


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000


def _first(*values):
    return next((v for v in values if v is not None), None)


def _stat(message: str) -> dict:
    """One `count=N ...` line of tsl's Stat/StatWithPercentiles, in microseconds. `count=N curr=X`
    (one run) and `count=N curr=X(all same)` mean every run took X."""
    fields = {k: _num(v) for k, v in _FIELD.findall(message)}
    if fields["count"] and "min" not in fields:
        x = fields.get("curr")
        fields.update(first=x, min=x, max=x, avg=x, std=0.0)
        fields.setdefault("median", x)
    return fields


def error_line(text: str) -> str:
    """The line that says why the tool failed: its first ERROR line, else a fatal signal, else a
    line naming a failure, else the last line printed."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for test in (lambda m: m.startswith("ERROR"), _FATAL.search,
                 lambda m: not m.startswith(("INFO", "WARNING", "VERBOSE")) and _FAILURE.search(m)):
        found = next((line for line in lines if test(line)), None)
        if found:
            return found
    return lines[-1] if lines else "it printed nothing"


def parse_output(text: str) -> dict:
    """benchmark_model's stdout+stderr -> init, first-inference and warm-up times, steady-state
    latency stats (ms), memory (MB) and how many nodes a delegate took. Values the tool did not
    print are None; output without a steady-state timing is a DeviceError quoting the tool's error."""
    found: dict[str, tuple] = {}
    stats: list[dict] = []
    replaced: dict[int, tuple[int, int | None]] = {}
    block = False
    for line in text.splitlines():
        message = _PREFIX.sub("", line.strip(), count=1)
        if _HEADER.match(message):
            block = True
        elif _STAT.match(message):
            stats.append(_stat(message))
        elif m := _REPLACING.search(message):
            replaced[int(m[3] or 0)] = (int(m[1]), int(m[2]) if m[2] else None)
        else:
            for key, pattern in [*_CLASSIC.items(), *((f"block_{k}", p) for k, p in _BLOCK.items())]:
                if m := pattern.match(message):
                    found[key] = m.groups()
                    break

    def get(key: str, i: int = 0) -> float | None:
        return _num(found[key][i]) if key in found else None

    # the warm-up stat line comes first, the regular one last; count=0 means no runs, no values
    warmup = stats[0] if stats else {}
    regular = stats[-1] if len(stats) > 1 and stats[-1]["count"] else {}
    warmup_runs = warmup["count"] if warmup else get("block_warmup", 1)
    timings = [_ms(get("timings_us", i)) for i in range(4)]
    mean = _first(_ms(regular.get("avg")), timings[3], get("block_mean"))
    if mean is None:
        raise DeviceError(f"benchmark_model printed no timings: {error_line(text)}")
    if regular:
        latency = {k: _ms(regular.get(src)) for k, src in
                   [("mean", "avg"), ("min", "min"), ("max", "max"), ("std", "std"), ("median", "median")]}
        latency.update({k: _ms(regular[k]) for k in ("p5", "p95") if k in regular})
    else:
        latency = {"mean": mean, "min": get("block_min"), "max": get("block_max"), "std": get("block_std"),
                   "median": None}
    totals = [total for _, total in replaced.values()]
    block_runs = int(found["block_mean"][1]) if "block_mean" in found else None
    return {
        "init_ms": _first(timings[0], get("session_ms"), get("block_init")),
        "first_inference_ms": None if warmup_runs == 0 else _first(_ms(warmup.get("first")), timings[1],
                                                                   get("block_first")),
        "warmup_avg_ms": None if warmup_runs == 0 else _first(_ms(warmup.get("avg")), timings[2],
                                                              get("block_warmup")),
        "runs": int(regular["count"]) if regular else block_runs,
        "latency_ms": latency,
        "memory_mb": {"init": _first(get("memory", 0), get("block_mem_init")),
                      "overall": _first(get("memory", 1), get("block_mem_overall")),
                      "peak": _first(get("peak"), get("block_mem_peak"))},
        "delegated_nodes": sum(n for n, _ in replaced.values()) if replaced else None,
        "total_nodes": sum(totals) if totals and None not in totals else None,
        "format": "litert_compiled_model" if block else "tflite_benchmark",
    }


def _escape(item: str) -> str:
    """A name or path inside --input_layer_value_files: ',' separates items and cannot be escaped;
    ':' is escaped as '::' (SplitInputLayerNameAndValueFile in LiteRT's benchmark_tflite_model.cc)."""
    if "," in item:
        raise MixdeployError(f"benchmark_model cannot take {item!r} in --input_layer_value_files: it contains ','")
    return item.replace(":", "::")


def command(binary: str, model: str, threads: int, runs: int, warmup: int, cpus: str | None = None,
            input_files: dict[str, str] | None = None, output_file: str | None = None,
            extra: list[str] | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None,
            max_secs: int = 150) -> list[str]:
    """The argv that runs `binary` on the device: pinned with `taskset cpus` (hex mask, e.g. "f0"),
    exactly `runs` timed and `warmup` warm-up runs (min_secs and warmup_min_secs 0) unless they take
    over `max_secs`, peak memory reported. `input_files` (name -> device path, every model input in the model's order) feed raw
    tensors and need `input_shapes`; `output_file` receives every output tensor's raw bytes.
    Both are flags of the TFLite-interpreter build only."""
    if cpus is not None and not re.fullmatch(r"(0x)?[0-9a-fA-F]+", cpus):
        raise MixdeployError(f"taskset mask {cpus!r} is not hexadecimal (cores 4-7 are 'f0')")
    argv = ["taskset", cpus] if cpus else []
    argv += [binary, f"--graph={model}", f"--num_threads={threads}", f"--num_runs={runs}",
             f"--warmup_runs={warmup}", "--min_secs=0", "--warmup_min_secs=0", f"--max_secs={max_secs}",
             "--report_peak_memory_footprint=true"]
    if input_files:
        shapes = input_shapes or {}
        if set(shapes) != set(input_files):
            raise MixdeployError(f"benchmark_model needs the shape of every input file's layer: "
                                 f"files for {sorted(input_files)}, shapes for {sorted(shapes)}")
        argv += ["--input_layer=" + ",".join(input_files),
                 "--input_layer_shape=" + ":".join(",".join(map(str, shapes[n])) for n in input_files),
                 "--input_layer_value_files=" + ",".join(f"{_escape(name)}:{_escape(path)}"
                                                         for name, path in input_files.items())]
    if output_file:
        argv.append(f"--output_filepath={output_file}")
    return argv + list(extra or [])


def _interpreter(elf: bytes) -> str | None:
    """The program loader a little-endian ELF file names (PT_INTERP), None for a static one."""
    wide = elf[4] == 2  # ELFCLASS64: other offsets and widths
    if len(elf) < 64:
        return None
    phoff = struct.unpack_from("<Q" if wide else "<I", elf, 32 if wide else 28)[0]
    size, count = struct.unpack_from("<HH", elf, 54 if wide else 42)
    if size == 0 or phoff + size * count > len(elf):  # damaged, or headers past what was read
        return None
    for at in range(phoff, phoff + size * count, size):
        if struct.unpack_from("<I", elf, at)[0] == 3:  # PT_INTERP
            offset, length = (struct.unpack_from("<Q16xQ", elf, at + 8) if wide
                              else struct.unpack_from("<I8xI", elf, at + 4))
            return elf[offset:offset + length].split(b"\0")[0].decode(errors="replace")
    return None


def _check_binary(path: Path, abi: str | None = None, what: str = "--benchmark-binary",
                  android: bool | None = None) -> None:
    """An ELF executable (for `abi`'s machine and, when `android` is known, that OS's loader), or a
    MixdeployError saying where to get one."""
    if not path.is_file():
        raise MixdeployError(f"{what} {path}: no such file; {PREBUILT}")
    with path.open("rb") as f:
        header = f.read(65536)  # the program headers and the loader's name come first
    if len(header) < 20 or header[:4] != b"\x7fELF" or int.from_bytes(header[16:18], "little") not in (2, 3):
        raise MixdeployError(f"{what} {path}: not an executable ELF file; {PREBUILT}")
    machine = int.from_bytes(header[18:20], "little")
    if abi in ABI_MACHINES and machine != ABI_MACHINES[abi]:
        raise MixdeployError(f"{what} {path}: built for {MACHINES.get(machine, f'ELF machine {machine}')}, "
                             f"the device is {abi}; {PREBUILT}")
    loader = _interpreter(header)
    if android is not None and loader and loader.startswith("/system/") != android:
        built, runs = ("Android", "Linux") if not android else ("Linux", "Android")
        raise MixdeployError(f"{what} {path}: built for {built} (its loader is {loader}), the device runs {runs}; "
                             f"{PREBUILT}")


def find_binary(explicit: str | None, abi: str, android: bool) -> Path:
    """The benchmark_model for a device's ABI and OS: --benchmark-binary, else
    $MIXDEPLOY_BENCHMARK_MODEL_DIR (default ~/.cache/mixdeploy/benchmark_model)/android-<abi>/ or
    linux-<abi>/ (or the OS-less <abi>/ of earlier versions, when its build suits the device)."""
    if explicit:
        path = Path(explicit).expanduser()
        _check_binary(path, abi, android=android)
        return path
    cache = Path(os.environ.get("MIXDEPLOY_BENCHMARK_MODEL_DIR") or CACHE).expanduser()
    path, earlier = cache / f"{'android' if android else 'linux'}-{abi}" / "benchmark_model", cache / abi / "benchmark_model"
    if path.is_file():
        _check_binary(path, abi, what="cached benchmark_model", android=android)
        return path
    if earlier.is_file():
        with contextlib.suppress(MixdeployError):  # another OS's build: not this device's
            _check_binary(earlier, abi, android=android)
            return earlier
    raise MixdeployError(f"no benchmark_model for {path.parent.name}: pass --benchmark-binary PATH or put it at {path} "
                         f"(nothing here can download it); {PREBUILT}")


def install(transport: Transport, binary_path_on_host: Path) -> str:
    """Push benchmark_model into the device's work folder; its path there."""
    binary = Path(binary_path_on_host)
    _check_binary(binary)
    remote = f"{transport.workdir}/benchmark_model"
    transport.push(binary, remote)
    transport.shell(["chmod", "+x", remote])
    return remote


def run(transport: Transport, remote_binary: str, model_on_device: str, threads: int = 1, runs: int = 50,
        warmup: int = 5, cpus: str | None = None, input_files: dict[str, str] | None = None,
        input_shapes: dict[str, tuple[int, ...]] | None = None, output_file: str | None = None,
        extra: list[str] | None = None, timeout: float = 600) -> dict:
    """Run the installed benchmark_model once and parse what it printed. A non-zero exit, or a flag
    the binary did not know (it would silently ignore input files), is a DeviceError quoting the tool."""
    # the tool's own limit past ours: its default (150 s) would cut a slow model's runs short unsaid
    argv = command(remote_binary, model_on_device, threads, runs, warmup, cpus, input_files, output_file, extra,
                   input_shapes, max_secs=math.ceil(timeout))
    result = transport.shell(argv, timeout=timeout, check=False)
    text = result.stdout + "\n" + result.stderr
    if result.code != 0:
        raise DeviceError(f"benchmark_model exited with code {result.code}: {error_line(text)}")
    unknown = next((line.strip() for line in text.splitlines() if "Unconsumed cmdline flags" in line), None)
    if unknown:
        raise DeviceError(f"benchmark_model ignored flags it does not know: {unknown}")
    return parse_output(text)


def read_outputs(raw: bytes, shapes_dtypes: list[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    """Split --output_filepath's bytes (every output tensor's raw bytes, in output order) into arrays."""
    sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shapes_dtypes]
    if sum(sizes) != len(raw):
        raise DeviceError(f"benchmark_model's output file holds {len(raw)} bytes; outputs "
                          f"{[(tuple(s), np.dtype(d).name) for s, d in shapes_dtypes]} need {sum(sizes)}")
    arrays, offset = [], 0
    for (shape, dtype), size in zip(shapes_dtypes, sizes):
        arrays.append(np.frombuffer(raw, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                                    offset=offset).reshape(shape).copy())
        offset += size
    return arrays
