"""Shared fixtures: the CLI run in-process, real photos, small checkpoints."""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mixnet_deploy.models import (
    DROPIN_EXAMPLES,
    MIXNETS,
    randomize_batchnorm,  # noqa: F401  (re-exported for tests)
)

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "mixnet_deploy" / "sample_images"
# every model but mixnet_s is swept at this input size (half the pixels of 224: a shorter suite);
# mixnet_s's own tests export it at 224
SWEEP_SIZE = (160, 160)
SWEPT = tuple(name for name in MIXNETS + DROPIN_EXAMPLES if name != "mixnet_s")


SLOW_FIXTURES = {"digits", "digits_exports", "sim_device"}  # minutes to build on a fresh machine


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that train the digits model or boot the ARM64 simulator are slow, marked or not."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


HEARTBEAT = re.compile(r"^mixdeploy: \[\d+ s\] ")  # the progress line long work prints when stderr is no terminal


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def message(self) -> list[str]:
        """The lines of stderr other than progress heartbeats."""
        return [line for line in self.err.splitlines() if not HEARTBEAT.match(line)]


@pytest.fixture(autouse=True)
def private_stale_list(tmp_path_factory, monkeypatch):
    """The work folders a lost device left behind are listed in the suite's own file, and devices are
    locked in the suite's own folder, not the user's."""
    import devices.transport

    monkeypatch.setattr(devices.transport, "STALE", tmp_path_factory.getbasetemp() / "stale-workdirs.json")
    monkeypatch.setattr(devices.transport, "LOCKS", tmp_path_factory.getbasetemp() / "device-locks")


@pytest.fixture
def run_cli(capsys):
    """Run `mixdeploy ARGS...` in this process; return exit code, stdout and stderr."""
    from cli import main

    def run(*args: str) -> Result:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def assert_usage_error(result: Result, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem (besides progress heartbeats), no traceback."""
    assert result.code == 2, result
    lines = result.message
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of this machine's processes that contain `text`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def still_running(text: str, within: float = 15) -> list[str]:
    """processes_mentioning(text) once they are gone or `within` seconds have passed (a kill and
    its reaping, under QEMU too, take a moment on a busy machine)."""
    deadline = time.monotonic() + within
    while (found := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


DIGITS_MODEL = ROOT / "tests" / "data" / "mixnet_s_digits.pth"  # digits.train()'s output, shipped


@pytest.fixture(scope="session")
def digits(request):
    """(dataset root, checkpoint) of mixnet_s trained on scikit-learn's digits: the shipped one while
    tests/digits.py is the recipe it was trained with, else trained here once and cached in pytest's
    cache folder."""
    import digits as d
    import torch

    recipe = hashlib.sha256((Path(__file__).parent / "digits.py").read_bytes()).hexdigest()[:12]
    root = Path(request.config.cache.mkdir(f"mixdeploy_digits_{recipe}"))
    if not (root / "eval").is_dir():
        d.write_dataset(root)
    if DIGITS_MODEL.exists() and torch.load(DIGITS_MODEL, weights_only=True).get("recipe") == recipe:
        return root, DIGITS_MODEL
    checkpoint = root / "mixnet_s_digits.pth"
    if not checkpoint.exists():
        d.train(root, recipe)
    return root, checkpoint


def probe_files(checkpoint: Path | None, name: str = "mixnet_s") -> int:
    """How many probe models tuning a model builds (the digits model by default): every candidate of
    every layer shape."""
    from mixnet_deploy import load_model
    from mixnet_deploy.cost_model import shape_key
    from mixnet_deploy.lower import analyse

    loaded = load_model(name, checkpoint)
    return sum({shape_key(i): len(i.candidates) for i in analyse(loaded.module, loaded.preprocess.input_size)}.values())


@pytest.fixture
def tune_cache(tmp_path_factory, monkeypatch) -> Path:
    """$MIXDEPLOY_TUNE_CACHE shared by the tests that tune the digits model: each device's timings
    get a file of their own, the probe model files are converted once for all of them."""
    folder = tmp_path_factory.getbasetemp() / "tune_cache"
    monkeypatch.setenv("MIXDEPLOY_TUNE_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def digits_exports(digits, tmp_path_factory):
    """The digits model exported for devices (fp32 and int8 TFLite, fp32 ONNX) and its eval photos: 32x32
    inputs keep on-device runs short, even under emulation."""
    from cli import main

    root, checkpoint = digits
    out = tmp_path_factory.mktemp("digits_exports")
    steps = [("export", "mixnet_s", "--checkpoint", checkpoint, "--format", "all", "-o", out / "fp32"),
             ("quantize", out / "fp32.tflite", "--calib", root / "train", "--num-calib", "64", "-o", out / "int8.tflite")]
    for args in steps:
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            assert exc.code == 0, args
    return {"fp32.tflite": out / "fp32.tflite", "fp32.onnx": out / "fp32.onnx", "int8.tflite": out / "int8.tflite",
            "eval": root / "eval"}


@pytest.fixture(scope="session")
def sim_device() -> dict:
    """The virtual ARM64 device (its root filesystem built on first use, about 2-3 minutes); stopped
    at the end. Missing tools fail the test: CI must run the device tests, not skip them."""
    from devices import sim

    sim.require_tools()
    yield sim.start()
    sim.stop()
