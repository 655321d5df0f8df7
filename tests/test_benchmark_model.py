"""benchmark_model: its real printed outputs (tests/data/benchmark_model, sources in SOURCES.md)
parse to the numbers they show, failures quote the tool, and the command line, the binary checks,
one run through a transport and the output file split are what the device needs."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from devices.benchmark_model import command, error_line, find_binary, install, parse_output, read_outputs, run
from devices.transport import ShellResult, Transport
from mixnet_deploy.errors import DeviceError, MixdeployError

DATA = Path(__file__).parent / "data" / "benchmark_model"
PYTHON = Path(sys.executable).resolve()  # a real x86_64 ELF executable


def recording(name: str) -> str:
    return (DATA / name).read_text()


def latency(mean, min, max, std, median=None, **percentiles):
    return {"mean": mean, "min": min, "max": max, "std": std, "median": median, **percentiles}


EXPECTED = {
    # INFO: prefixes, new memory line, no XNNPACK line (tensorflow/tensorflow#61946)
    "tflite_info_prefix.txt": {
        "init_ms": 0.53, "first_inference_ms": 124.020, "warmup_avg_ms": 117.225, "runs": 50,
        "latency_ms": latency(116.066, 111.222, 121.324, 1.906),
        "memory_mb": {"init": 3.75, "overall": 12.1914, "peak": None},
        "delegated_nodes": None, "total_nodes": None, "format": "tflite_benchmark"},
    # no prefix, old `Peak memory footprint (MB): init= overall=` line
    "tflite_no_prefix_old_memory.txt": {
        "init_ms": 0.847, "first_inference_ms": 57.338, "warmup_avg_ms": 47.6741, "runs": 30,
        "latency_ms": latency(47.4403, 44.914, 49.309, 1.087),
        "memory_mb": {"init": 1.26562, "overall": 26.6641, "peak": None},
        "delegated_nodes": None, "total_nodes": None, "format": "tflite_benchmark"},
    # p5/median/p95, %g numbers (avg=1.24027e+06), a one-run warm-up printed as `count=1 curr=X`
    "tflite_percentiles_g_format.txt": {
        "init_ms": 5.579, "first_inference_ms": 1357.602, "warmup_avg_ms": 1357.602, "runs": 50,
        "latency_ms": latency(1240.27, 1238.588, 1252.566, 2.565, 1239.807, p5=1238.753, p95=1247.415),
        "memory_mb": {"init": 6.36328, "overall": 109.832, "peak": None},
        "delegated_nodes": None, "total_nodes": None, "format": "tflite_benchmark"},
    # CompiledModel: stat lines (µs, kept) + the BENCHMARK RESULTS block (memory only there),
    # `Replacing 1 out of 1 node(s)`, and an op profile whose `Timings (microseconds): count=3166`
    # line must not be taken for the regular runs
    "litert_compiled_model_xnnpack.txt": {
        "init_ms": 4.478, "first_inference_ms": 1.033, "warmup_avg_ms": 0.465319, "runs": 2112,
        "latency_ms": latency(0.464545, 0.442, 0.979, 0.013, 0.462, p5=0.460, p95=0.478),
        "memory_mb": {"init": 8.94, "overall": 11.51, "peak": None},
        "delegated_nodes": 1, "total_nodes": 1, "format": "litert_compiled_model"},
    # the CompiledModel block alone (its %.2f ms values), peak memory "not available"
    "litert_block_only.txt": {
        "init_ms": 23744.73, "first_inference_ms": 7441.04, "warmup_avg_ms": 7441.04, "runs": 10,
        "latency_ms": latency(7430.20, 7416.40, 7448.86, 9.92),
        "memory_mb": {"init": 6391.74, "overall": 6391.74, "peak": None},
        "delegated_nodes": None, "total_nodes": None, "format": "litert_compiled_model"},
    # constructed (see SOURCES.md): `count=N curr=X(all same) p5= median= p95=`, periodic peak memory
    "constructed_all_same_peak.txt": {
        "init_ms": 41.25, "first_inference_ms": 1.2, "warmup_avg_ms": 1.2, "runs": 50,
        "latency_ms": latency(1.2, 1.2, 1.2, 0.0, 1.2, p5=1.2, p95=1.2),
        "memory_mb": {"init": 9.5, "overall": 10.25, "peak": 27.1289},
        "delegated_nodes": 62, "total_nodes": 64, "format": "tflite_benchmark"},
}

FAILURES = {
    "failure_unknown_op.txt": "ERROR: Didn't find op for builtin opcode 'MUL' version '5'. An older version of "
                              "this builtin might be supported. Are you using an old TFLite binary with a newer "
                              "model?",
    "failure_flex_ops.txt": "ERROR: Regular TensorFlow ops are not supported by this interpreter. Make sure you "
                            "apply/link the Flex delegate before inference.",
    "failure_segfault.txt": "Segmentation fault",
}


def test_every_recording_is_tested():
    assert {p.name for p in DATA.glob("*.txt")} == set(EXPECTED) | set(FAILURES)
    assert all(name in (DATA / "SOURCES.md").read_text() for name in [*EXPECTED, *FAILURES])


@pytest.mark.parametrize("name", EXPECTED)
def test_recording_parses_to_the_printed_numbers(name):
    _same(parse_output(recording(name)), EXPECTED[name])


def _same(got, want):
    """Nested dict equality with float tolerance (pytest.approx does not nest dicts)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, dict):
            _same(got[key], value)
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("name", FAILURES)
def test_failure_output_raises_with_the_tools_line(name):
    with pytest.raises(DeviceError) as err:
        parse_output(recording(name))
    assert FAILURES[name] in str(err.value)
    assert "\n" not in str(err.value)


def test_warmup_stats_without_regular_runs_is_a_failure():
    # shape of tensorflow/tensorflow#62506: the warm-up ran, then the Flex delegate failed
    text = ("INFO: count=23009 first=38091 curr=20 min=18 max=38091 avg=21.434 std=251\n\n"
            "ERROR: Op type not registered 'RegexSplitWithOffsets' in binary running on host.\n"
            "ERROR: Node number 1139 (TfLiteFlexDelegate) failed to prepare.\n")
    with pytest.raises(DeviceError, match="RegexSplitWithOffsets"):
        parse_output(text)


def test_old_replacing_line_gives_delegated_nodes_only():
    # the pre-2.6 line, as logged in asus4/tf-lite-unity-sample#214
    text = recording("tflite_info_prefix.txt") + (
        "INFO: Replacing 269 node(s) with delegate (TfLiteXNNPackDelegate) node, yielding 13 partitions.\n")
    parsed = parse_output(text)
    assert (parsed["delegated_nodes"], parsed["total_nodes"]) == (269, None)


def test_replacing_lines_add_up_over_subgraphs():
    text = recording("tflite_info_prefix.txt") + (
        "VERBOSE: Replacing 10 out of 12 node(s) with delegate (TfLiteXNNPackDelegate) node, yielding 2 partitions"
        " for subgraph 0.\n"
        "VERBOSE: Replacing 3 out of 3 node(s) with delegate (TfLiteXNNPackDelegate) node, yielding 1 partitions"
        " for subgraph 1.\n")
    parsed = parse_output(text)
    assert (parsed["delegated_nodes"], parsed["total_nodes"]) == (13, 15)


def test_no_warmup_runs_leave_first_and_warmup_unknown():
    # --warmup_runs=0 --warmup_min_secs=0: the warm-up Stat prints count=0, the summary 0 and nan
    text = recording("tflite_info_prefix.txt").replace(
        "INFO: count=5 first=124020 curr=116061 min=115177 max=124020 avg=117225 std=3412", "INFO: count=0").replace(
        "First inference: 124020, Warmup (avg): 117225", "First inference: 0, Warmup (avg): nan")
    parsed = parse_output(text)
    assert parsed["first_inference_ms"] is None and parsed["warmup_avg_ms"] is None
    assert parsed["latency_ms"]["mean"] == pytest.approx(116.066)


def test_a_negative_nan_in_a_stat_line_is_unknown():
    # glibc prints NaN as -nan (a std of one run on some builds)
    text = recording("tflite_info_prefix.txt").replace(
        "INFO: count=50 first=121183 curr=115199 min=111222 max=121324 avg=116066 std=1906",
        "INFO: count=50 first=121183 curr=115199 min=111222 max=121324 avg=116066 std=-nan")
    parsed = parse_output(text)
    assert parsed["latency_ms"]["mean"] == pytest.approx(116.066) and parsed["latency_ms"]["std"] is None


def test_all_same_without_percentiles():
    # tsl Stat::OutputToStream before percentiles existed: `count=N curr=X(all same)`
    text = recording("tflite_info_prefix.txt").replace(
        "INFO: count=50 first=121183 curr=115199 min=111222 max=121324 avg=116066 std=1906",
        "INFO: count=50 curr=116066(all same)")
    parsed = parse_output(text)
    assert parsed["runs"] == 50
    assert parsed["latency_ms"] == pytest.approx({"mean": 116.066, "min": 116.066, "max": 116.066, "std": 0.0,
                                                  "median": 116.066})


def test_error_line_prefers_error_then_signal_then_failure_then_last_line():
    assert error_line("INFO: fine\nERROR: broken\nSegmentation fault\n") == "ERROR: broken"
    assert error_line("WARNING: Failed to get the input model file size.\nAborted\n") == "Aborted"
    assert error_line("STARTING!\nFailed to load model /x.tflite\nBenchmarking failed.\n") == \
        "Failed to load model /x.tflite"
    assert error_line("STARTING!\nbye\n") == "bye"
    assert error_line("") == "it printed nothing"


# --- the command line ---------------------------------------------------------------------------

def test_command_flags_and_taskset():
    argv = command("/data/local/tmp/w/benchmark_model", "/data/local/tmp/w/m.tflite", threads=2, runs=30,
                   warmup=3, cpus="f0", output_file="/data/local/tmp/w/out.bin", extra=["--use_xnnpack=false"],
                   max_secs=900)
    assert argv == ["taskset", "f0", "/data/local/tmp/w/benchmark_model", "--graph=/data/local/tmp/w/m.tflite",
                    "--num_threads=2", "--num_runs=30", "--warmup_runs=3", "--min_secs=0", "--warmup_min_secs=0",
                    "--max_secs=900", "--report_peak_memory_footprint=true", "--output_filepath=/data/local/tmp/w/out.bin",
                    "--use_xnnpack=false"]
    assert command("bm", "m.tflite", 1, 5, 1)[0] == "bm"


def test_command_input_files_escape_colons():
    argv = command("bm", "m.tflite", 1, 5, 1,
                   input_files={"serving_default_input:0": "/tmp/w/in:0.bin", "b": "/tmp/w/b.bin"},
                   input_shapes={"serving_default_input:0": (1, 224, 224, 3), "b": (1, 10)})
    assert argv[-3:] == ["--input_layer=serving_default_input:0,b",
                         "--input_layer_shape=1,224,224,3:1,10",
                         "--input_layer_value_files=serving_default_input::0:/tmp/w/in::0.bin,b:/tmp/w/b.bin"]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"cpus": "4-7"}, "not hexadecimal"),
    ({"input_files": {"x": "/a.bin"}}, "needs the shape"),
    ({"input_files": {"x,y": "/a.bin"}, "input_shapes": {"x,y": (1,)}}, "contains ','"),
])
def test_command_rejects(kwargs, fragment):
    with pytest.raises(MixdeployError, match=fragment):
        command("bm", "m.tflite", 1, 5, 1, **kwargs)


# --- the binary ---------------------------------------------------------------------------------

def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def _android_build() -> bytes:
    """This Python's executable with Android's loader named in place of glibc's."""
    elf = PYTHON.read_bytes()
    loader = next(name for name in (b"/lib64/ld-linux-x86-64.so.2", b"/lib/ld-linux-x86-64.so.2") if name in elf)
    return elf.replace(loader, b"/system/bin/linker64".ljust(len(loader), b"\0"), 1)


def test_find_binary_explicit(tmp_path):
    with pytest.raises(MixdeployError) as err:
        find_binary(str(tmp_path / "nope"), "arm64-v8a", android=True)
    assert _one_line(err).startswith(f"--benchmark-binary {tmp_path / 'nope'}: no such file")
    assert "android_arm64, linux_arm64, linux_x86_64" in str(err.value)
    script = tmp_path / "benchmark_model"
    script.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(MixdeployError) as err:
        find_binary(str(script), "arm64-v8a", android=True)
    assert "not an executable ELF file" in _one_line(err)
    with pytest.raises(MixdeployError) as err:
        find_binary(str(PYTHON), "arm64-v8a", android=True)
    assert "built for x86_64, the device is arm64-v8a" in _one_line(err)
    assert find_binary(str(PYTHON), "x86_64", android=False) == PYTHON
    with pytest.raises(MixdeployError) as err:  # Android's builds load through /system/bin/linker64
        find_binary(str(PYTHON), "x86_64", android=True)
    assert "built for Linux (its loader is /lib" in _one_line(err) and "the device runs Android" in str(err.value)
    android_build = tmp_path / "android_benchmark_model"
    android_build.write_bytes(_android_build())
    with pytest.raises(MixdeployError) as err:
        find_binary(str(android_build), "x86_64", android=False)
    assert "built for Android (its loader is /system/bin/linker64), the device runs Linux" in _one_line(err)
    assert find_binary(str(android_build), "x86_64", android=True) == android_build
    cut = tmp_path / "cut_benchmark_model"  # a download cut short: its program headers are missing
    cut.write_bytes(PYTHON.read_bytes()[:60])
    assert find_binary(str(cut), "x86_64", android=False) == cut


def test_find_binary_cache_folder(tmp_path, monkeypatch):
    """Android and Linux builds for one ABI are cached side by side; the OS-less folder of earlier
    versions still serves a device whose OS its build suits."""
    monkeypatch.setenv("MIXDEPLOY_BENCHMARK_MODEL_DIR", str(tmp_path))
    with pytest.raises(MixdeployError) as err:
        find_binary(None, "arm64-v8a", android=True)
    assert str(tmp_path / "android-arm64-v8a" / "benchmark_model") in _one_line(err)
    builds = {"linux-x86_64": PYTHON.read_bytes(), "android-x86_64": _android_build()}
    for folder, build in builds.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "benchmark_model").write_bytes(build)
    assert find_binary(None, "x86_64", android=False) == tmp_path / "linux-x86_64" / "benchmark_model"
    assert find_binary(None, "x86_64", android=True) == tmp_path / "android-x86_64" / "benchmark_model"
    (tmp_path / "linux-x86_64" / "benchmark_model").rename(tmp_path / "legacy")
    (tmp_path / "x86_64").mkdir()
    (tmp_path / "legacy").rename(tmp_path / "x86_64" / "benchmark_model")
    assert find_binary(None, "x86_64", android=False) == tmp_path / "x86_64" / "benchmark_model"
    (tmp_path / "android-x86_64" / "benchmark_model").unlink()
    with pytest.raises(MixdeployError) as err:  # the old folder's Linux build is not an Android device's
        find_binary(None, "x86_64", android=True)
    assert str(tmp_path / "android-x86_64" / "benchmark_model") in _one_line(err)


# --- one run through a transport ------------------------------------------------------------------

class FakeDevice(Transport):
    """A device whose benchmark_model prints a recording; remembers what was pushed and run."""

    name = "fake"

    def __init__(self, printed: str, code: int = 0) -> None:
        super().__init__()
        self.printed, self.code, self.pushed, self.commands = printed, code, [], []

    def _shell(self, command: str, timeout: float) -> ShellResult:
        command = command.split("; ", 1)[1] if command.startswith("echo $$ ") else command  # Transport's pgid record
        self.commands.append(command)
        if command.startswith("mktemp"):
            return ShellResult(0, "/data/local/tmp/mixdeploy.abc\n", "")
        if command.startswith("chmod"):
            return ShellResult(0, "", "")
        return ShellResult(self.code, "", self.printed)

    def push(self, local, remote) -> None:
        self.pushed.append((Path(local), remote))


def test_install_then_run_parses():
    device = FakeDevice(recording("tflite_percentiles_g_format.txt"))
    remote = install(device, PYTHON)
    result = run(device, remote, "/data/local/tmp/mixdeploy.abc/m.tflite", threads=4, runs=50, warmup=1, cpus="f0",
                 timeout=99.5)
    assert result["latency_ms"]["median"] == pytest.approx(1239.807)
    assert remote == "/data/local/tmp/mixdeploy.abc/benchmark_model"
    assert device.pushed == [(PYTHON, remote)]
    assert device.commands[1] == f"chmod +x {remote}"
    assert shlex.split(device.commands[2]) == command(remote, "/data/local/tmp/mixdeploy.abc/m.tflite", 4, 50, 1,
                                                      "f0", max_secs=100)  # the tool stops past our limit too


def test_run_failures_quote_the_tool():
    with pytest.raises(DeviceError, match="exited with code 139: Segmentation fault"):
        run(FakeDevice(recording("failure_segfault.txt"), code=139), "bm", "m.tflite")
    with pytest.raises(DeviceError, match="ignored flags it does not know: Unconsumed cmdline flags: -use-gpu=true"):
        run(FakeDevice(recording("failure_segfault.txt").replace("Segmentation fault", "")
                       + recording("tflite_info_prefix.txt")), "bm", "m.tflite")
    with pytest.raises(MixdeployError, match="not an executable ELF file"):
        install(FakeDevice(""), Path(__file__))


# --- the output file ------------------------------------------------------------------------------

def test_read_outputs_splits_in_order():
    logits = np.arange(10, dtype=np.float32).reshape(1, 10)
    codes = np.array([[-3, 7]], dtype=np.int8)
    arrays = read_outputs(logits.tobytes() + codes.tobytes(), [((1, 10), np.float32), ((1, 2), np.int8)])
    np.testing.assert_array_equal(arrays[0], logits)
    np.testing.assert_array_equal(arrays[1], codes)
    assert arrays[0].dtype == np.float32 and arrays[1].dtype == np.int8


def test_read_outputs_rejects_wrong_size():
    with pytest.raises(DeviceError, match="holds 39 bytes.*need 40"):
        read_outputs(bytes(39), [((1, 10), np.float32)])
