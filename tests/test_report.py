"""The bench report renderer: Markdown table and PNG plot from result dicts (synthetic: it only renders)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from devices.report import EMULATION_NOTE, write_report
from devices.runners import latency_stats
from mixnet_deploy.parity import DEPLOYED_TOLERANCE, ParityReport, compare

DEVICE = {"name": "adb:127.0.0.1:5555", "abi": "arm64-v8a", "model": "sdk_gphone64_arm64", "os": "Android 14",
          "cores": [{"cpu": i, "max_khz": 1800000 if i < 4 else 2400000} for i in range(8)], "big_cores": [4, 5, 6, 7],
          "governor": "schedutil", "mem_free_mb": 1234, "temps": {"zone0": 40.9}, "emulated": False}


def result(file: str, precision: str, median_ms: float, cosine: float, top1: float, passed: bool = True) -> dict:
    rng = np.random.default_rng(len(file))
    latency = {t: latency_stats(median_ms / int(t) ** 0.6 * rng.lognormal(0, 0.08, 20)) for t in ("1", "2", "4")}
    fmt = file.rsplit(".", 1)[1]
    return {"file": f"build/{file}", "model": "mixnet_s", "weights": "random-init+calibrated-bn", "format": fmt,
            "precision": precision, "size_bytes": 16_500_000 if precision == "fp32" else 4_400_000, "init_ms": 12.34,
            "input_shape": [1, 3, 224, 224] if fmt == "onnx" else [1, 224, 224, 3],
            "first_inference_ms": 20.16, "peak_memory_mb": None if fmt == "onnx" else 45.2,
            "latency_ms": latency["1"], "latency_by_threads": latency,
            "parity": {"samples": 14, "top1_agreement": top1, "top5_agreement": 1.0, "cosine": cosine,
                       "max_abs": 1e-6, "rel_max": 2e-7, "psnr_db": 120.04, "sqnr_db": 110.0,
                       "tolerance": DEPLOYED_TOLERANCE[precision], "passed": passed},
            "runner": "python", "temps_before": {"zone0": 41.2 + median_ms / 10},
            "temps_after": {"zone0": 43.5 + median_ms / 10}}


RESULTS = [result("s.onnx", "fp32", 30.0, 0.9999999, 1.0), result("s.tflite", "fp32", 28.0, 0.9999998, 1.0),
           result("s_fp16.tflite", "fp16", 22.0, 0.99995, 0.9286), result("s_int8.tflite", "int8", 11.0, 0.9812, 0.7143)]


def rows(text: str, name: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith(f"| {name} ")]


def test_report_tables_every_file_and_thread_count(tmp_path):
    (tmp_path / "out").mkdir()
    md, png = write_report(tmp_path / "out" / "bench.md", DEVICE, RESULTS)
    assert (md.name, png.name, md.parent, png.parent) == ("bench.md", "bench.png", tmp_path / "out", tmp_path / "out")
    text = md.read_text()
    assert text.startswith("# Benchmark on adb:127.0.0.1:5555, ")
    assert "- Cores: 8: cpu0–3 1.80 GHz; cpu4–7 2.40 GHz **(big)** (not pinned: any core)" in text
    assert "zone0 44.2 → 44.6 °C" in text  # before the first file (bench's own record), after the last
    assert "Free memory: 1234 MB" in text and "Governor: schedutil" in text
    assert EMULATION_NOTE not in text and "Emulated: no" in text
    assert "![median latency and parity per file](bench.png)" in text
    fastest = RESULTS[3]["latency_by_threads"]["1"]["median"]
    for r in RESULTS:
        found = rows(text, r["file"].split("/")[1])
        assert [row[5] for row in found] == ["1", "2", "4"]
        for row, t in zip(found, ("1", "2", "4")):
            lat = r["latency_by_threads"][t]
            assert row[:5] == [r["file"].split("/")[1], r["format"], r["precision"],
                               "1×3×224×224" if r["format"] == "onnx" else "1×224×224×3", f"{r['size_bytes'] / 1e6:.2f}"]
            assert row[6:12] == [f"{lat[k]:.2f}" for k in ("min", "median", "mean", "p90", "p99", "std")]
            assert row[12:15] == ["12.3", "20.2", "—" if r["format"] == "onnx" else "45.2"]
            assert row[15:20] == [f"{r['parity']['top1_agreement']:.1%}", "100.0%", f"{r['parity']['cosine']:.7f}",
                                  "120.0", "PASS"]
            assert row[20] == (f"{lat['median'] / fastest:.2f}×" if t == "1" else "")
    assert rows(text, "s_int8.tflite")[0][20] == "1.00×"
    assert "- s.tflite (fp32, 14 samples): max_rel ≤ 0.0001 (measured 2e-07), min_top1 ≥ 1 (measured 1): PASS" in text
    assert "- s_int8.tflite (int8, 14 samples): min_cosine ≥ 0.97 (measured 0.9812000): PASS" in text
    assert sorted(p.name for p in md.parent.iterdir()) == ["bench.md", "bench.png"]


def test_report_plot_is_a_readable_png(tmp_path):
    _, png = write_report(tmp_path / "bench.md", DEVICE, RESULTS)
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert (1500 < image.width < 2500) and (600 < image.height < 1200)
    assert png.stat().st_size > 30_000
    assert write_report(tmp_path / "again.md", DEVICE, RESULTS)[1].read_bytes() == png.read_bytes()


def test_emulated_device_and_failed_parity_are_loud(tmp_path):
    failed = result("s_int8.tflite", "int8", 11.0, 0.91, 0.5, passed=False)
    md, png = write_report(tmp_path / "emu.md", {**DEVICE, "emulated": True}, [RESULTS[1], failed])
    text = md.read_text()
    assert f"> **⚠ EMULATED: {EMULATION_NOTE}.**" in text and "Emulated: yes" in text
    assert [row[19] for row in rows(text, "s_int8.tflite")] == ["**FAIL**"] * 3
    assert [row[19] for row in rows(text, "s.tflite")] == ["PASS"] * 3
    assert "min_cosine ≥ 0.97 (measured 0.9100000): **FAIL**" in text
    assert png.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["emu.md", "emu.png"]


def test_stored_parity_of_another_form_is_not_a_report():
    report = compare(np.eye(3), np.eye(3) * 1.01, min_cosine=0.97)
    assert ParityReport.from_dict(report.to_dict()) == report
    assert ParityReport.from_dict({"passed": True, "rel_max": 0.1}) is None and ParityReport.from_dict({}) is None


def test_cosine_of_a_single_logit_model_is_taken_over_the_batch():
    """Per sample, one logit's cosine is +-1 whatever its value: a wrong output must still fail."""
    logits = np.random.default_rng(0).standard_normal((16, 1))
    assert compare(logits, logits * 1.001, min_cosine=0.97).passed
    off = logits + np.random.default_rng(1).standard_normal((16, 1)) * 3
    assert not compare(logits, off, min_cosine=0.97).passed


def test_report_marks_the_cores_of_the_cpus_mask(tmp_path):
    """--cpus f0 on a phone: its big cores used; a mask of little cores: those; a CPU whose cores
    are alike has no big ones."""
    for mask, cores in (("f0", "cpu0–3 1.80 GHz; cpu4–7 2.40 GHz **(big, used)**"),
                        ("3", "cpu0–1 1.80 GHz **(used)**; cpu2–3 1.80 GHz; cpu4–7 2.40 GHz **(big)**")):
        write_report(tmp_path / "r.md", DEVICE, [{**r, "cpus": mask} for r in RESULTS])
        assert f"- Cores: 8: {cores}\n" in (tmp_path / "r.md").read_text()
    alike = {**DEVICE, "cores": [{"cpu": i, "max_khz": 2800000} for i in range(2)], "big_cores": [0, 1]}
    write_report(tmp_path / "r.md", alike, [{**r, "cpus": "2"} for r in RESULTS])
    assert "- Cores: 2: cpu0 2.80 GHz; cpu1 2.80 GHz **(used)**\n" in (tmp_path / "r.md").read_text()
    unknown = {**DEVICE, "cores": [{"cpu": i, "max_khz": None} for i in range(2)], "big_cores": [0, 1], "governor": None}
    write_report(tmp_path / "r.md", unknown, RESULTS)  # a VM: no frequencies, no governor
    text = (tmp_path / "r.md").read_text()
    assert "- Cores: 2: cpu0–1 (not pinned: any core)\n" in text and "- Governor: unknown\n" in text


def test_latency_statistics():
    """The runner's figures of a known list of ms: the median of an even count, numpy's interpolated
    percentiles, the population std."""
    stats = latency_stats([float(t) for t in range(10, 0, -1)])
    assert stats == {"median": 5.5, "mean": 5.5, "min": 1.0, "p90": pytest.approx(9.1), "p99": pytest.approx(9.91),
                     "std": pytest.approx(8.25 ** 0.5), "runs": 10, "raw": [float(t) for t in range(10, 0, -1)]}


def test_json_output_is_strict(capsys):
    """A broken kernel's NaN or infinite outputs print as null: jq and strict parsers reject NaN."""
    from cli import _echo_json

    _echo_json({"parity": {"cosine": float("nan"), "max_abs": float("inf")}, "runs": [1.5, float("-inf")]})
    assert json.loads(capsys.readouterr().out) == {"parity": {"cosine": None, "max_abs": None}, "runs": [1.5, None]}


def test_metadata_is_strict_json(tmp_path):
    """A file kept aside for NaN outputs stores its parity report as strict JSON too."""
    import onnx
    from onnx import TensorProto, helper

    from exporters.formats import FORMATS

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    tensor = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in "xy"]
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", tensor[:1],
                                                  tensor[1:])), tmp_path / "m.onnx")
    FORMATS["onnx"].add_metadata(tmp_path / "m.onnx", {"mixdeploy.parity": {"cosine": float("nan"), "samples": 4}})
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(stored["mixdeploy.parity"], parse_constant=refuse) == {"cosine": None, "samples": 4}
    report = compare(np.ones((2, 3)), np.full((2, 3), np.nan), max_rel=1e-5)  # a broken kernel's outputs
    FORMATS["onnx"].add_metadata(tmp_path / "m.onnx", {"mixdeploy.parity": report.to_dict()})
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    back = ParityReport.from_dict(json.loads(stored["mixdeploy.parity"], parse_constant=refuse))
    assert np.isnan(back.cosine) and not back.passed and "nan" in back.summary()  # as `info` prints it


def test_console_prints_names_as_they_are(capsys):
    """Paths and names reach the console as written: no markup is parsed in them (a `[/b]` raised)."""
    from cli import err, out

    out.print("a[/b] [bold]c[/bold]")
    err.print("report: runs/[old]/r.md")
    captured = capsys.readouterr()
    assert captured.out == "a[/b] [bold]c[/bold]\n" and captured.err == "report: runs/[old]/r.md\n"


def test_a_mean_standing_in_for_the_median_says_so(tmp_path):
    """An older benchmark_model prints no median: its mean is reported in the median column, marked."""
    from devices.report import median

    old = {**RESULTS[1]["latency_ms"], "median_is_mean": True}
    assert median(old) == f"{old['median']:.2f} (mean)" and "(mean)" not in median(RESULTS[1]["latency_ms"])
    write_report(tmp_path / "r.md", DEVICE, [{**RESULTS[1], "latency_by_threads": {"1": old}}])
    assert f"| {old['median']:.2f} (mean) |" in (tmp_path / "r.md").read_text()


def test_delegation_lines_name_what_xnnpack_left(tmp_path):
    partial = {**RESULTS[3], "delegation": {"nodes": 64, "delegated": 62, "partitions": 2,
                                            "not_delegated": {"AVERAGE_POOL_2D": 1, "HARD_SWISH": 1}}}
    old_tool = {**RESULTS[1], "delegation": {"nodes": None, "delegated": 269}}  # benchmark_model without "out of M"
    md, _ = write_report(tmp_path / "bench.md", DEVICE, [RESULTS[0], old_tool, partial])
    text = md.read_text()
    assert text.endswith("## Delegation on the device\n\n- s.tflite: XNNPACK takes 269 of — nodes\n"
                         "- s_int8.tflite: XNNPACK takes 62 of 64 nodes in 2 partitions (left to the CPU kernels: "
                         "AVERAGE_POOL_2D ×1, HARD_SWISH ×1)\n")
    assert "Delegation" not in write_report(tmp_path / "onnx.md", DEVICE, RESULTS[:1])[0].read_text()
