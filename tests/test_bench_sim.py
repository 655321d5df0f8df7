"""`mixdeploy bench` and `export --tune` on the virtual ARM64 device through the real adb client:
parity computed by ARM kernels, ARM int8 outputs against x86, tuning and its cache, and a device
that fails, times out or disappears mid-run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import probe_files, still_running

from devices import sim
from devices.adb import AdbTransport
from devices.bench import Settings, bench
from devices.runners import LiteRtRunner
from devices.tune import tune
from mixnet_deploy.errors import DeviceError

pytestmark = pytest.mark.slow


def leftover_workdirs(serial: str) -> list[str]:
    done = subprocess.run(["adb", "-s", serial, "shell", "ls /data/local/tmp"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr  # an empty list from a failed ls would pass every leftover check
    return [name for name in done.stdout.split() if name.startswith("mixdeploy.")]


def test_bench_fp32_and_int8_on_arm(sim_device, digits_exports, run_cli, tmp_path):
    serial = sim_device["serial"]
    before = leftover_workdirs(serial)
    files = [digits_exports["fp32.tflite"], digits_exports["int8.tflite"], digits_exports["fp32.onnx"]]
    result = run_cli("bench", *files, "--device", serial, "--runs", "3", "--parity", digits_exports["eval"],
                     "--parity-samples", "16", "--json", "--report", tmp_path / "arm.md")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["device"]["abi"] == "arm64-v8a" and report["device"]["emulated"] is True
    fp32, int8, onnx = report["results"]
    for r in report["results"]:
        assert r["parity"]["passed"] and r["parity"]["samples"] == 16 and r["latency_ms"]["median"] > 0
    assert fp32["parity"]["rel_max"] < 1e-4 and fp32["parity"]["top1_agreement"] == 1.0
    assert onnx["runtime"].startswith("onnxruntime") and fp32["runtime"] == "ai-edge-litert 2.3.0"
    assert int8["precision"] == "int8" and int8["parity"]["cosine"] > 0.97
    for r in (fp32, int8):  # ARM's XNNPACK takes every node too
        assert r["delegation"]["delegated"] == r["delegation"]["nodes"] > 10 and r["delegation"]["not_delegated"] == {}
    assert onnx["delegation"] is None
    assert "EMULATED" in (tmp_path / "arm.md").read_text()
    assert set(leftover_workdirs(serial)) <= set(before)  # ours removed (and any a lost run left)


def test_arm_int8_outputs_match_x86(sim_device, digits_exports, tmp_path):
    """The same int8 file on the same inputs: ARM's XNNPACK kernels against x86's."""
    model = digits_exports["int8.tflite"]
    local = LiteRtRunner(model)
    x = np.random.default_rng().standard_normal((6, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    from devices import runners

    with AdbTransport(sim_device["serial"]) as device:
        work = device.workdir
        for src, dst in ((runners.__file__, "runner.py"), (model, "m.tflite"), (tmp_path / "x.npy", "x.npy")):
            device.push(src, f"{work}/{dst}")
        device.shell(["python3", f"{work}/runner.py", "bench", f"{work}/m.tflite", f"{work}/x.npy", f"{work}/y.npy",
                      "--runs", "1", "--warmup", "0"], timeout=600)
        device.pull(f"{work}/y.npy", tmp_path / "y.npy")
    arm = np.load(tmp_path / "y.npy")
    x86 = local.run(local.feed(x))
    step = local.output["quantization"][0]
    assert np.abs(arm - x86).max() <= step + 1e-6, np.abs(arm - x86).max() / step
    assert (arm.argmax(1) == x86.argmax(1)).all()


def test_runner_failure_and_timeout_clean_up(sim_device, digits_exports, run_cli):
    serial, model = sim_device["serial"], digits_exports["fp32.tflite"]
    before = leftover_workdirs(serial)
    common = ["--device", serial, "--parity", digits_exports["eval"], "--parity-samples", "2", "--runs", "2"]
    broken = run_cli("bench", model, *common, "--python", "/bin/false")
    assert broken.code == 1 and "cannot import numpy and ai_edge_litert" in broken.err
    slow = run_cli("bench", model, *common, "--runs", "100000", "--timeout", "20")
    assert slow.code == 1 and len(slow.message) == 1
    assert "did not finish" in slow.err and "within --timeout 20 s (100000 runs at 1 thread(s)): raise --timeout" in slow.err
    assert set(leftover_workdirs(serial)) <= set(before)  # ours removed (and any a lost run left)
    assert not still_running("--runs 100000 ")  # the runner cut off on the device is killed, not left running


def test_tune_on_arm_then_cache_hit(sim_device, run_cli, tmp_path, tune_cache):
    """The tuning mechanism on the ARM device (emulated times: nothing about which plan wins), on a
    network with one MixConv so that the emulated probes stay few."""
    from test_own_network import write_network

    write_network(tmp_path / "net", "armnet")
    name = f"{tmp_path / 'net' / 'armnet.py'}:build"
    args = ["export", name, "--format", "tflite", "--tune", sim_device["serial"], "--tune-runs", "3", "--json",
            "--force", "-o", tmp_path / "tuned.tflite"]
    first = run_cli(*args)
    assert first.code == 0, first.err
    tuning = json.loads(first.out)[0]["tuning"]
    assert tuning["measured_shapes"] == 1 and tuning["cached_shapes"] == 0
    assert tuning["fingerprint"]["abi"] == "arm64-v8a" and tuning["fingerprint"]["emulated"]
    assert tuning["timing"] == {"rounds": 3, "runs": 3}
    assert sum(tuning["probes"].values()) == probe_files(None, name) > 5
    # the per-layer plan without its kept swaps is timed when a swap was kept (emulated times: either may be)
    assert set(tuning["whole_model_ms"]) - {"per-layer"} == {"tuned", "auto", "split", "fold"}
    assert not tuning["refined"] or "per-layer" in tuning["whole_model_ms"]
    assert tuning["layers"] and all(layer["layer"] for layer in tuning["layers"])
    for layer in tuning["layers"]:
        assert layer["choice"] in layer["times_ms"] and min(layer["times_ms"].values()) > 0
    second = run_cli(*args)
    assert second.code == 0, second.err
    again = json.loads(second.out)[0]["tuning"]
    assert again["measured_shapes"] == 0 and again["cached_shapes"] == tuning["measured_shapes"]
    assert again["layers"] == tuning["layers"]  # every layer's times and choice come from the cache
    assert again["probes"] == {"converted": 0, "reused": 0}


def test_device_disappears_mid_tuning(sim_device, digits, tmp_path, monkeypatch):
    """The device's daemon dies after the second layer shape: a clear DeviceError, the cache holds
    exactly the finished shapes, adb reports the device offline, and start() brings it back."""
    from mixnet_deploy import load_model

    monkeypatch.setenv("MIXDEPLOY_TUNE_CACHE", str(tmp_path / "cache"))
    _, checkpoint = digits
    loaded = load_model("mixnet_s", checkpoint)

    def step(text: str, done: int, total: int) -> None:
        if text.startswith("layer") and done == 2:
            sim.stop()

    try:
        with pytest.raises(DeviceError) as failure:
            tune(loaded.module, loaded.preprocess.input_size, AdbTransport(sim_device["serial"]), "tflite",
                 settings=Settings([1], runs=2, warmup=3), rounds=1, step=step)
        # a push or a command, whichever came next: both say the device was lost, in one line
        assert str(failure.value).startswith(f"lost adb device {sim_device['serial']} during `adb "), failure.value
        assert "\n" not in str(failure.value)
        files = list((tmp_path / "cache").glob("*.json"))
        assert len(files) == 1 and not [f for f in (tmp_path / "cache").iterdir() if f.name.startswith(".")]
        cached = json.loads(files[0].read_text())
        assert len(cached["shapes"]) == 2 and all(cached["shapes"].values())
        offline = subprocess.run(["adb", "-s", sim_device["serial"], "shell", "true"], capture_output=True, text=True)
        assert offline.returncode != 0
    finally:
        sim.start()
    with pytest.raises(DeviceError, match="could not connect to adb device 127.0.0.1:1: .*refused"):
        AdbTransport("127.0.0.1:1")


def test_device_vanishing_mid_bench_is_one_line(sim_device, digits_exports):
    settings = Settings([1], runs=2, parity_dir=str(digits_exports["eval"]), parity_samples=2)

    def step(text: str) -> None:
        if "runs at" in text:
            sim.stop()

    before = set(leftover_workdirs(sim_device["serial"]))  # another suite's lost runs, listed in its own file
    try:
        with pytest.raises(DeviceError) as failure:
            bench([str(digits_exports["fp32.tflite"])], AdbTransport(sim_device["serial"]), settings, step=step)
        assert "\n" not in str(failure.value)
    finally:
        sim.start()
    lost = set(leftover_workdirs(sim_device["serial"])) - before
    assert lost  # the lost run's folder is still there...
    with AdbTransport(sim_device["serial"]) as device:  # ...until the next run on this device removes it
        work = Path(device.workdir).name
        assert set(leftover_workdirs(sim_device["serial"])) - before == {work}
