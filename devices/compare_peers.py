"""`mixdeploy bench --compare-peers MODEL`: the same model (timm's, or the user's own) and weights
exported by mixdeploy and by every peer available here, benchmarked side by side on one device with
parity."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from exporters import peers
from exporters.export import export
from exporters.inspect_file import inspect_file
from mixnet_deploy import load_model
from mixnet_deploy.errors import MixdeployError
from mixnet_deploy.models import file_stem
from mixnet_deploy.preprocess import SAMPLE_IMAGES

from .bench import Settings, bench, check_runner
from .transport import Transport


def _peer_files(model, spec: str, size: tuple[int, int, int], work: Path, precision: str, calib,
                step: Callable[[str], None]) -> tuple[dict[str, Path], dict[str, str]]:
    """Peer label -> file, and peer label -> why it is missing. `spec`: the model's name, as a peer in
    its own environment builds it."""
    name = file_stem(spec)
    files, missing = {}, {}
    step("peer: plain torch.onnx.export")
    plain, why = peers.run_checked(peers.plain_onnx, model, name, work / "plain", size)
    label = "ORT quantize_static (defaults)" if precision == "int8" else "plain torch.onnx.export"
    if plain is not None and precision == "int8":
        step("peer: onnxruntime.quantization defaults")
        plain, why = peers.run_checked(peers.ort_quantizer, plain, calib)
    if plain is None:  # an own network torch.onnx.export cannot take as it is: a finding, not a crash
        missing[label] = f"failed: {why}"
    else:
        files[label] = plain
    for peer in ("onnx2tf", "litert_torch"):
        if precision == "int8" and peer == "litert_torch":
            continue  # its int8 path needs a PT2E quantizer recipe, not a converter flag
        label = f"{peer}{' -oiqt' if precision == 'int8' else ''}"
        step(f"peer: {label}")
        args = (calib if precision == "int8" else None, size) if peer == "onnx2tf" else (size, spec)
        path, why = peers.convert(peer, model, name, work / peer, *args)
        if path is None:
            missing[label] = why
        else:
            files[label] = path
    return files, missing


def keep_folder(keep: str) -> Path:
    """--keep DIR: a new or empty folder (created), so no earlier comparison's files are mixed in."""
    folder = Path(keep)
    try:
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise MixdeployError(f"--keep {keep}: {'is not a folder' if not folder.is_dir() else 'is not empty'}; "
                                 "give a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise MixdeployError(f"--keep {keep}: cannot write in it ({exc.strerror})") from None
    return folder


@contextlib.contextmanager
def _work_folder(keep: Path | None) -> Iterator[Path]:
    """`keep` (empty from keep_folder, and emptied again when the comparison fails or is stopped, so it
    can run again), or a temporary folder removed at the end."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="mixdeploy-peers-") as tmp:
            yield Path(tmp)
        return
    try:
        yield keep
    except BaseException:
        for entry in keep.iterdir():  # best effort: the error that got here is the one to report
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
        raise


def compare_peers(name: str, device: Transport, settings: Settings, precision: str = "fp32",
                  checkpoint: str | None = None, calibrate_bn: bool = False, input_size: tuple[int, int] | None = None,
                  keep: Path | None = None, pretrained: bool = False,
                  step: Callable[[str], None] = lambda _: None) -> dict:
    """Ours (ONNX and TFLite) and the peers' files of NAME at `precision` (fp32 or int8, the int8
    ones calibrated on the same photos), benchmarked together; each row says whose file it is and
    its median latency relative to ours in the same format. The files are written to `keep` (from
    keep_folder) or to a temporary folder (removed; rows then name them relative to it)."""
    from quantization import NUM_CALIB
    from quantization.calibration import load_folder
    from quantization.quantize import quantize

    step(f"checking the runtimes on {device.name}")
    check_runner(device, settings, {"onnx", "tflite"}, step)  # before the exports: they take minutes
    loaded = load_model(name, checkpoint, pretrained, calibrate_bn, input_size)
    stem = file_stem(name)
    with _work_folder(keep) as work:
        (work / "ours").mkdir()
        step(f"exporting {name} with mixdeploy")
        ours = {r.format: r.path for r in export(name, "all", work / "ours" / stem, checkpoint=checkpoint,
                                                 pretrained=pretrained,
                                                 calibrate_bn=calibrate_bn, input_size=input_size, step=step)}
        photos = settings.parity_dir or SAMPLE_IMAGES  # a sample of a large folder, the same one quantize takes
        calib = load_folder(photos, loaded.preprocess, limit=NUM_CALIB).images.numpy()
        if precision == "int8":  # calibrated on all of them, as the peers are (not on quantize's four fifths)
            ours = {fmt: quantize(str(path), photos, path.with_name(f"{stem}_int8.{fmt}"), num_calib=len(calib),
                                  eval_dir=photos, step=step).path for fmt, path in ours.items()}
        meta = inspect_file(ours["onnx"])["metadata"]
        files, missing = _peer_files(loaded.module, loaded.name, loaded.preprocess.input_size, work, precision,
                                    calib, step)
        owners = {str(p): ("mixdeploy", fmt) for fmt, p in ours.items()}
        owners |= {str(p): (label, p.suffix[1:]) for label, p in files.items()}
        measured = bench(list(owners), device, settings, step=step, metadata={str(p): meta for p in files.values()})
    ours_ms = {fmt: r["latency_ms"]["median"] for r in measured["results"]
               for who, fmt in [owners[r["file"]]] if who == "mixdeploy"}
    for r in measured["results"]:
        who, fmt = owners[r["file"]]
        r.update(source=who, ratio_to_ours=r["latency_ms"]["median"] / ours_ms[fmt])
        if not keep:
            r["file"] = str(Path(r["file"]).relative_to(work))
    measured["missing_peers"] = missing
    measured["peer_versions"] = peers.versions()
    measured["kept_in"] = str(keep.resolve()) if keep else None
    measured["model"] = {"name": loaded.name, "weights": loaded.weights, "precision": precision,
                         "input_size": list(loaded.preprocess.input_size)}
    return measured
