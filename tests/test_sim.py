"""The virtual ARM64 device through the real `adb` client: shell exit codes and streams, push and
pull, quoting, a killed command, LiteRT on the device computing what it computes on x86, and
stop/start. The first run builds the root filesystem (about 2-3 minutes)."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_usage_error, processes_mentioning, still_running

from devices import sim
from mixnet_deploy.errors import MixdeployError

pytestmark = pytest.mark.slow
REMOTE = "/data/local/tmp/mixdeploy-test"
# Runs on the host and on the device: each (model, input) pair in argv -> outputs saved to one .npz.
RUN_LITERT = """
import sys
import numpy as np
import onnxruntime  # noqa: F401  (importable on the device too)
from ai_edge_litert.interpreter import Interpreter

outputs = []
for model, data in zip(sys.argv[2::2], sys.argv[3::2]):
    interpreter = Interpreter(model_path=model, num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.load(data))
    interpreter.invoke()
    outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
np.savez(sys.argv[1], *outputs)
"""


def adb(device: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`adb -s SERIAL ARGS...` with the real client; stdout and stderr as text."""
    return subprocess.run(["adb", "-s", device["serial"], *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_shell_runs_on_aarch64(sim_device):
    done = adb(sim_device, "shell", "uname", "-m")
    assert (done.returncode, done.stdout) == (0, "aarch64\n")


def test_shell_exit_code_and_streams(sim_device):
    assert adb(sim_device, "shell", "sh -c 'exit 3'").returncode == 3
    done = adb(sim_device, "shell", "echo out; echo err >&2")
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")


def test_quoted_argument_survives(sim_device):
    text = "two  spaces $HOME 'single' \"double\" ;|&"
    done = adb(sim_device, "shell", "printf", "'%s\\n'", shlex.quote(text))
    assert done.stdout == text + "\n"


def test_push_pull_round_trip(sim_device, tmp_path):
    blob = os.urandom(3 * 1024 * 1024 + 12345)  # many 64 KiB sync chunks
    (tmp_path / "blob.bin").write_bytes(blob)
    remote = f"{REMOTE}/new/dir/blob.bin"  # fixed_push_mkdir: the folders are created
    assert adb(sim_device, "push", str(tmp_path / "blob.bin"), remote).returncode == 0
    on_device = adb(sim_device, "shell", "sha256sum", remote).stdout.split()[0]
    assert on_device == hashlib.sha256(blob).hexdigest()
    assert adb(sim_device, "pull", remote, str(tmp_path / "back.bin")).returncode == 0
    assert (tmp_path / "back.bin").read_bytes() == blob


def test_pull_missing_file_fails_clearly(sim_device, tmp_path):
    done = adb(sim_device, "pull", f"{REMOTE}/missing.bin", str(tmp_path / "x"))
    message = done.stdout + done.stderr  # this adb prints its errors to stdout when it is not a terminal
    assert done.returncode != 0
    assert "missing.bin" in message and "No such file" in message


def test_output_streams_and_closing_hangs_up_the_shell(sim_device):
    """As Android's adbd: output streams as it comes; a host that closes the stream first hangs up
    the shell (SIGHUP to it alone), and what the shell started runs on (bench's cleanup stops that:
    test_bench_sim)."""
    client = subprocess.Popen(["adb", "-s", sim_device["serial"], "shell", "echo started; sleep 31.5; echo done"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline() == "started\n"  # before the command ends
    try:
        for _ in range(100):  # the shell has started its child
            if processes_mentioning("sleep 31.5 "):
                break
            time.sleep(0.1)
        client.kill()
        client.wait()
        for _ in range(50):
            if not processes_mentioning("echo started; sleep 31.5"):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the shell still runs after the host closed its stream")
        assert processes_mentioning("sleep 31.5 ")
        sim.stop()  # what a cut-off command left running goes with the device
        assert not still_running("sleep 31.5 ")
    finally:
        subprocess.run(["pkill", "-f", "sleep 31.5"], check=False)
        sim.start()


def _tiny_models(folder: Path) -> list[Path]:
    """A float and an int8 TFLite model of conv -> relu6 -> depthwise conv -> mean -> dense."""
    from exporters.tflite_export import tensorflow

    tf = tensorflow()
    rng = np.random.default_rng(0)
    conv = tf.constant(rng.normal(size=(3, 3, 3, 8)).astype(np.float32) * 0.3)
    depthwise = tf.constant(rng.normal(size=(5, 5, 8, 1)).astype(np.float32) * 0.2)
    dense = tf.constant(rng.normal(size=(8, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32)])
    def model(x):
        y = tf.nn.relu6(tf.nn.conv2d(x, conv, 1, "SAME"))
        y = tf.nn.depthwise_conv2d(y, depthwise, [1, 1, 1, 1], "SAME")
        return tf.reduce_mean(y, axis=[1, 2]) @ dense

    paths = []
    for name in ("float", "int8"):
        converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
        if name == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)]
                                                        for _ in range(16))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        paths.append(folder / f"{name}.tflite")
        paths[-1].write_bytes(converter.convert())
    return paths


@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")
def test_litert_on_device_matches_x86(sim_device, tmp_path):
    models = _tiny_models(tmp_path)
    np.save(tmp_path / "input.npy", np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32))
    (tmp_path / "run.py").write_text(RUN_LITERT)
    for path in [*models, tmp_path / "input.npy", tmp_path / "run.py"]:
        assert adb(sim_device, "push", str(path), f"{REMOTE}/{path.name}").returncode == 0
    pairs = [arg for model in models for arg in (model.name, "input.npy")]
    done = adb(sim_device, "shell", f"cd {REMOTE} && python3 run.py out.npz {' '.join(pairs)}")
    assert done.returncode == 0, done.stderr
    assert adb(sim_device, "pull", f"{REMOTE}/out.npz", str(tmp_path / "arm64.npz")).returncode == 0
    subprocess.run([sys.executable, "run.py", "x86.npz", *pairs], cwd=tmp_path, check=True, capture_output=True)
    arm64, x86 = np.load(tmp_path / "arm64.npz"), np.load(tmp_path / "x86.npz")
    np.testing.assert_allclose(arm64["arr_0"], x86["arr_0"], rtol=1e-5, atol=1e-5)  # float: rounding only
    np.testing.assert_array_equal(arm64["arr_1"], x86["arr_1"])  # int8 kernels: bit-exact (no SME)


def test_stop_start_and_status(sim_device, run_cli):
    running = sim.start()  # already running: the same device
    assert running["serial"] == sim_device["serial"] and running["pid"] == sim.status()["pid"]
    assert sim.status()["running"] and sim.status()["serial"] == sim_device["serial"]
    port = int(sim_device["serial"].rsplit(":", 1)[1])
    assert_usage_error(run_cli("device", "sim", "stop", "--port", port + 1), f"runs on port {port}, not {port + 1}")
    assert_usage_error(run_cli("device", "sim", "status", "--port", port), "--port goes with start or stop")
    assert sim.status()["running"]
    stopped = run_cli("device", "sim", "stop", "--port", port, "--json")
    assert stopped.code == 0 and json.loads(stopped.out)["running"] is False
    assert not sim.status()["running"] and sim.status()["built"]
    assert adb(sim_device, "get-state").returncode != 0
    restarted = sim.start()
    assert restarted["serial"] == sim_device["serial"] and restarted["pid"] != running["pid"]
    assert adb(sim_device, "shell", "uname", "-m").stdout == "aarch64\n"


def test_missing_tools_or_root_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(sim.shutil, "which", lambda tool: None if tool == "debootstrap" else f"/usr/bin/{tool}")
    with pytest.raises(MixdeployError, match=r"needs debootstrap: run `apt-get install qemu-user-static debootstrap"):
        sim.start()
    monkeypatch.setattr(sim.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(sim.os, "geteuid", lambda: 1000)
    with pytest.raises(MixdeployError, match="needs root"):
        sim.build()
