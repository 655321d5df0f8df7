"""Parity metrics: plain functions over arrays, shared by export checks, quantization and devices."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from .errors import MixdeployError

if TYPE_CHECKING:
    import torch

# what a deployed file must keep of the PyTorch model's outputs (bench, quantize), per precision; top-1
# agreement of fp16 and int8 is reported, not gated: it depends on the model's margins (random-init
# logits are flat). export's own check of an fp16 file is stricter (formats.py: cosine and top-1).
DEPLOYED_TOLERANCE = {"fp32": {"max_rel": 1e-4, "min_top1": 1.0}, "fp16": {"min_cosine": 0.999},
                      "int8": {"min_cosine": 0.97}}


# a float32 file's bound (max_rel 1e-5) is raised, for a model whose own float32 run is close to it, to this
# many times the error PyTorch makes in float32 on the same inputs, up to FLOAT32_CEILING (bench's fp32
# bound): float32 arithmetic alone puts a deep model there (mixnet_xl and mixnet_xxl at 160x160, BatchNorm
# calibrated: PyTorch 4.8e-6 to 1.5e-5 of max|ref|; our xxl files 4.0-9.9e-6 over 12 input sets, and once
# above 1e-5 in a test run)
FLOAT32_SLACK = 2.0
FLOAT32_CEILING = 1e-4


@dataclass
class ParityReport:
    """How far `candidate` is from `reference` (batch of logits), and whether that is within tolerance.

    rel_max is max|candidate - reference| / max|reference|: the tolerance that would just have passed.
    """

    samples: int
    max_abs: float
    max_ref: float
    rel_max: float
    rel_l2: float
    cosine: float  # the lowest per-sample cosine similarity (of the batch for one output per sample)
    psnr_db: float
    sqnr_db: float  # signal (reference) to error power
    top1_agreement: float
    top5_agreement: float  # fraction of samples whose reference top-1 is in the candidate's top-5
    tolerance: dict
    passed: bool

    def summary(self) -> str:
        return (f"max abs {self.max_abs:.3g} ({self.rel_max:.3g} of max|ref|), rel L2 {self.rel_l2:.3g}, "
                f"cosine {self.cosine:.6f}, top-1 {self.top1_agreement:.1%}, top-5 {self.top5_agreement:.1%}, "
                f"{self.samples} samples: {'PASS' if self.passed else 'FAIL'}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict) -> ParityReport | None:
        """The report `to_dict` stored (in a file's metadata), or None when it has other fields
        (empty, or written by another version). A figure stored as null (strict JSON's NaN) is NaN again."""
        try:
            report = cls(**stored)
        except TypeError:
            return None
        for f in fields(report):
            if f.type == "float" and getattr(report, f.name) is None:
                setattr(report, f.name, float("nan"))
        return report


def top_classes(out: np.ndarray, k: int) -> np.ndarray:
    """Each row's k highest classes, best first; ties (int8 outputs have them) to the lower class, as argmax."""
    return np.argsort(-out, axis=1, kind="stable")[:, :k]


def float32_error(model: torch.nn.Module, x: torch.Tensor, reference: np.ndarray) -> float:
    """rel_max of the model run by PyTorch in float32 against its float64 `reference` on `x`: what
    float32 arithmetic alone costs on these inputs, the floor below which no float32 file can be held."""
    import copy

    import torch

    with torch.no_grad():  # a copy: the caller's model keeps its dtypes
        out = copy.deepcopy(model).float().eval()(x.float()).numpy()
    return float(np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-30))


def reference_outputs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The PyTorch model's outputs computed in float64: the exact result that float32 files and
    rewrites are measured against (float32 PyTorch itself is off by a few 1e-6 on deep models)."""
    import copy

    import torch

    threads = torch.get_num_threads()
    # float64 convs run as many small parallel regions, whose threads wait on each other: beside another
    # busy process, export mixnet_s took 290 s on 2 threads and 28 s on one (idle: 22-25 s vs 28 s)
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return copy.deepcopy(model).double().eval()(x.double()).numpy()
    except RuntimeError as exc:  # "Input type (float) and bias type (double)": a cast in the user's forward()
        if not ("Input type" in str(exc) or "dtype" in str(exc) or "scalar type" in str(exc)):
            raise
        raise MixdeployError(f"the model does not run in float64, which the parity reference needs "
                             f"({str(exc).splitlines()[0][:100]}); a forward() casting to float32 (x.float(), "
                             "torch.float32 tensors) must leave the input's dtype alone") from None
    finally:
        torch.set_num_threads(threads)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal (reference) to error power, in dB, computed in float64."""
    ref = reference.astype(np.float64)
    return float(10 * np.log10(max(np.sum(ref**2), 1e-30) / max(np.sum((candidate - ref) ** 2), 1e-30)))


def compare(reference: np.ndarray, candidate: np.ndarray, max_rel: float | None = None,
            min_cosine: float | None = None, min_top1: float | None = None) -> ParityReport:
    """Compare two (N, classes) outputs; each given threshold must hold for `passed`."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    out = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: {ref.shape} vs {out.shape}")
    diff = out - ref
    max_abs = float(np.abs(diff).max())
    max_ref = float(np.abs(ref).max())
    rmse = float(np.sqrt(np.mean(diff**2)))
    # per sample; a single output per sample (one logit) would give +-1 each: then over the batch
    a, b = (ref, out) if ref.shape[1] > 1 else (ref.T, out.T)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)))
    top1_ref = ref.argmax(1)
    top5_out = top_classes(out, 5)
    tolerance = {k: v for k, v in {"max_rel": max_rel, "min_cosine": min_cosine, "min_top1": min_top1}.items()
                 if v is not None}
    report = ParityReport(
        samples=len(ref),
        max_abs=max_abs,
        max_ref=max_ref,
        rel_max=max_abs / max(max_ref, 1e-30),
        rel_l2=float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
        cosine=cosine,
        psnr_db=float(20 * np.log10((max_ref + 1e-5) / (rmse + 1e-10))),
        sqnr_db=sqnr_db(ref, out),
        top1_agreement=float(np.mean(out.argmax(1) == top1_ref)),
        top5_agreement=float(np.mean([t in row for t, row in zip(top1_ref, top5_out)])),
        tolerance=tolerance,
        passed=True,
    )
    report.passed = (
        (max_rel is None or report.rel_max <= max_rel)
        and (min_cosine is None or report.cosine >= min_cosine)
        and (min_top1 is None or report.top1_agreement >= min_top1)
    )
    return report
