import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PHOTOS, ROOT, assert_usage_error

pytestmark = pytest.mark.slow


def test_bench_compares_files_side_by_side(tmp_path, run_cli, monkeypatch):
    # at 160x160: what is tested is the harness, not the model's size (at 128 the int8 cosine is 0.980, near 0.97)
    assert run_cli("export", "mixnet_s", "--calibrate-bn", "--input-size", "160", "--format", "all",
                   "-o", tmp_path / "s").code == 0
    assert run_cli("quantize", tmp_path / "s.tflite", "--calib", PHOTOS, "-o", tmp_path / "s_int8.tflite").code == 0
    (tmp_path / "s.onnx").rename(tmp_path / "S.ONNX")  # suffixes in any letter case
    files = [tmp_path / "S.ONNX", tmp_path / "s.tflite", tmp_path / "s_int8.tflite"]
    result = run_cli("bench", *files, "--threads", "1,2", "--runs", "5", "--json", "--report", tmp_path / "r.md")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["device"]["name"] == "local" and not report["device"]["emulated"]
    markdown = (tmp_path / "r.md").read_text()
    assert all(f.name in markdown for f in files) and (tmp_path / "r.png").stat().st_size > 10_000
    rows = report["results"]
    assert [(r["format"], r["precision"]) for r in rows] == [("onnx", "fp32"), ("tflite", "fp32"), ("tflite", "int8")]
    assert [r["input_shape"] for r in rows] == [[1, 3, 160, 160], [1, 160, 160, 3], [1, 160, 160, 3]]
    for r in rows:
        assert r["latency_ms"]["median"] > 0 and len(r["latency_ms"]["raw"]) == 5
        assert set(r["latency_by_threads"]) == {"1", "2"}
        assert r["parity"]["passed"] and r["parity"]["samples"] == len(list(PHOTOS.glob("*.jpg")))
        assert r["peak_memory_mb"] > r["model_memory_mb"] > 0 and r["init_ms"] > 0
    assert rows[0]["parity"]["top1_agreement"] == 1.0 and rows[0]["parity"]["rel_max"] < 1e-5
    assert rows[0]["delegation"] is None  # ONNX: no delegate
    for r in rows[1:]:  # what XNNPACK took in the runner's own interpreter: all of it, one partition
        assert r["delegation"]["delegated"] == r["delegation"]["nodes"] > 100 and r["delegation"]["partitions"] == 1
    assert f"s_int8.tflite: XNNPACK takes {rows[2]['delegation']['nodes']} of" in markdown
    table = run_cli("bench", files[1], files[2], "--runs", "3")
    assert table.code == 0 and "PASS" in table.out and "fp32" in table.out
    assert f"s.tflite: XNNPACK takes {rows[1]['delegation']['nodes']} of {rows[1]['delegation']['nodes']} nodes" in table.out
    assert table.out.count("weights random-init+calibrated-bn") == 1  # two LiteRT files of one model: one line

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("devices.report.write_report", full_disk)
    alone = run_cli("bench", files[1], "--runs", "3", "--json", "--report", tmp_path / "r2.md")
    assert_usage_error(alone, "cannot write the report", "No space left on device")
    one = json.loads(alone.out)["results"][0]  # the results are printed before the report is written
    # memory: one model on one image, not the runners of other thread counts as well
    assert 0.67 < rows[1]["model_memory_mb"] / one["model_memory_mb"] < 1.5


def test_bench_bad_input(tmp_path, run_cli, monkeypatch):
    assert_usage_error(run_cli("bench", tmp_path / "missing.tflite"), "does not exist")
    assert_usage_error(run_cli("bench", tmp_path), "is a directory")
    assert_usage_error(run_cli("bench", "mixnet_s"), "is a model name", "--compare-peers mixnet_s")
    # files and model names are checked before the device is reached (an unroutable host would take 30 s)
    assert_usage_error(run_cli("bench", tmp_path / "missing.tflite", "--device", "ssh:u@10.255.255.1"), "does not exist")
    assert_usage_error(run_cli("bench", PHOTOS / "coffee.jpg", "--device", "ssh:u@10.255.255.1"), "reads .onnx and .tflite")
    assert_usage_error(run_cli("bench", "--compare-peers", "mixnet_ss", "--device", "ssh:u@10.255.255.1"),
                       "unknown model 'mixnet_ss'")
    model = tmp_path / "m.tflite"
    model.write_bytes(b"not read before the device is reached")
    for device, fragment in (("adb:", "names no device"), ("adb:127.0.0.1:99999", "not a TCP port"),
                             ("ssh:u@127.0.0.1:99999", "not a TCP port")):
        assert_usage_error(run_cli("bench", model, "--device", device), fragment)
    monkeypatch.setenv("MIXDEPLOY_SSH_OPTIONS", '-i "my key')
    assert_usage_error(run_cli("bench", model, "--device", "ssh:u@127.0.0.1"), "balance its quotes")
    assert_usage_error(run_cli("bench", tmp_path / "m.tflite", "--threads", "one"), "--threads")
    assert_usage_error(run_cli("bench", tmp_path / "m.tflite", "--threads", "1,0"), "1 or more")


def test_a_file_that_no_longer_computes_its_model_fails(digits_exports, tmp_path, run_cli):
    """A file whose weights changed after the export (a hand edit, another tool's rewrite) still names
    its model: bench compares it with that model, reports FAIL and exits 1 with one line."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(digits_exports["fp32.onnx"]))
    classifier = next(n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")).input[1]
    weight = next(t for t in model.graph.initializer if t.name == classifier)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.01), classifier))
    onnx.save(model, str(tmp_path / "edited.onnx"))
    args = ["bench", digits_exports["fp32.onnx"], tmp_path / "edited.onnx", "--runs", "3", "--parity", digits_exports["eval"],
            "--parity-samples", "8"]
    result = run_cli(*args, "--json")
    assert result.code == 1 and [r["parity"]["passed"] for r in json.loads(result.out)["results"]] == [True, False]
    assert result.message == [line for line in result.message if "parity failed for" in line] and len(result.message) == 1
    assert str(tmp_path / "edited.onnx") in result.message[0] and str(digits_exports["fp32.onnx"]) not in result.message[0]
    table = run_cli(*args)
    assert table.code == 1 and "FAIL" in table.out and "PASS" in table.out


def test_runs_pinned_to_the_cores_asked_for(digits_exports, run_cli):
    result = run_cli("bench", digits_exports["fp32.onnx"], "--cpus", "2", "--runs", "3", "--parity-samples", "2",
                     "--parity", digits_exports["eval"], "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["settings"]["cpus"] == report["results"][0]["cpus"] == "2" and report["results"][0]["parity"]["passed"]
    assert report["results"][0]["cores_run_on"] == {"1": [1]}  # mask 2: core 1 alone, as the runner saw it
    assert report["results"][0]["cpus_by_threads"] == {"1": "2"}
    unpinned = json.loads(run_cli("bench", digits_exports["fp32.onnx"], "--runs", "3", "--parity-samples", "2",
                                  "--parity", digits_exports["eval"], "--json").out)
    assert unpinned["results"][0]["cpus"] is None
    assert unpinned["results"][0]["cores_run_on"] == {"1": sorted(os.sched_getaffinity(0))}


def test_each_thread_count_runs_on_its_own_cores(digits_exports, tmp_path):
    """The runner pins each thread count to its own mask before making its thread pool (a phone's
    1-thread run on its prime core, its 4-thread run on the four fastest)."""
    from devices.runners import OrtRunner

    model = digits_exports["fp32.onnx"]
    shape = [1, *OrtRunner(model).input.shape[1:]]
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    done = subprocess.run([sys.executable, str(ROOT / "devices" / "runners.py"), "bench", model, tmp_path / "x.npy",
                           tmp_path / "y.npy", "--threads", "1,2", "--runs", "2", "--affinity", "1=2,2=3"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["cores"] == {"1": [1], "2": [0, 1]}
