"""`mixdeploy bench --report`: a Markdown report and a PNG plot comparing benchmarked files on one device."""
from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .atomic import write_atomic

EMULATION_NOTE = "latency measured under QEMU emulation: meaningless for speed; parity is real, computed by ARM kernels"
# parity tolerance -> (the measured value it bounds, how it bounds it, how that value is printed)
TOLERANCE_MEASURES = {"max_rel": ("rel_max", "≤", ".3g"), "min_cosine": ("cosine", "≥", ".7f"),
                      "min_top1": ("top1_agreement", "≥", "g")}


def write_report(path: Path, device: dict, results: list[dict]) -> list[Path]:
    """Write `path` (Markdown) and the plot beside it (same stem, .png), each atomically; return both paths."""
    path = Path(path)
    png = path.with_suffix(".png")
    if png == path:
        raise ValueError(f"the report is Markdown, not {path}")
    plot, text = _plot_png(device, results), _markdown(device, results, png.name).encode()  # both made, then written
    write_atomic(png, plot)
    write_atomic(path, text)
    return [path, png]


def _markdown(device: dict, results: list[dict], plot_name: str) -> str:
    """The report: title, device, emulation warning, results table with the plot, tolerances."""
    threads, ref = _thread_counts(results)
    title = f"# Benchmark on {device.get('name', 'unknown device')}"
    lines = [f"{title}, {datetime.now():%Y-%m-%d %H:%M}", ""]
    if device.get("emulated"):
        lines += [f"> **⚠ EMULATED: {EMULATION_NOTE}.**", ""]
    lines += ["## Device", "", *_device_lines(device, results), "", "## Results", ""]
    sources = sorted({(r["model"], r["weights"], r.get("runner", "python")) for r in results})
    runs = "/".join(str(n) for n in sorted({lat["runs"] for r in results for lat in r["latency_by_threads"].values()}))
    lines += [f"- {m}, weights {w}, timed by the {runner} runner" for m, w, runner in sources]
    lines += [f"- latency in ms over {runs} runs per thread count; ratio of medians to the fastest file at {ref} thread(s)", ""]
    lines += _table(results, threads, ref)
    lines += ["", f"![median latency and parity per file]({quote(plot_name)})", "", "## Parity tolerances", ""]
    lines += _tolerance_lines(results)
    delegated = [line for line in map(delegation_line, results) if line]
    if delegated:
        lines += ["", "## Delegation on the device", "", *(f"- {line}" for line in delegated)]
    return "\n".join(lines) + "\n"


def _thread_counts(results: list[dict]) -> tuple[list[str], str]:
    """Every thread count measured, ascending, and the one ratios are taken at (1 if every file has it)."""
    threads = sorted({t for r in results for t in r["latency_by_threads"]}, key=int)
    ref = "1" if all("1" in r["latency_by_threads"] for r in results) else threads[0]
    return threads, ref


def _device_lines(device: dict, results: list[dict]) -> list[str]:
    """The device's description; temperatures before the first file's run and after the last one's."""
    before, after = results[0].get("temps_before") or {}, results[-1].get("temps_after") or {}
    temps = ", ".join(f"{z} {before.get(z, '?')} → {after.get(z, '?')} °C" for z in sorted({*before, *after}))
    free = device.get("mem_free_mb")
    return [f"- ABI: {device.get('abi') or 'unknown'}", f"- Model: {device.get('model') or 'unknown'}",
            f"- OS: {device.get('os') or 'unknown'}", f"- Cores: {_cores(device, results[0].get('cpus'))}",
            f"- Governor: {device.get('governor') or 'unknown'}",
            f"- Free memory: {'unknown' if free is None else f'{free} MB'}",
            f"- Temperatures (before → after): {temps or 'unknown'}",
            f"- Emulated: {'yes' if device.get('emulated') else 'no'}"]


def _cores(device: dict, mask: str | None) -> str:
    """Runs of consecutive cores alike in max frequency, bigness and use, e.g. `cpu0–3 1.80 GHz;
    cpu4–7 2.40 GHz (big, used)`: big only on a CPU whose cores differ, used = in the --cpus mask."""
    cores = sorted(device.get("cores") or [], key=lambda c: c["cpu"])
    big = set(device.get("big_cores") or []) if len({c.get("max_khz") for c in cores}) > 1 else set()
    runs: list[list] = []  # [first cpu, last cpu, khz, tags]
    for core in cores:
        tags = [tag for tag, on in (("big", core["cpu"] in big), ("used", mask and int(mask, 16) >> core["cpu"] & 1))
                if on]
        key = (core.get("max_khz"), ", ".join(tags))
        if runs and runs[-1][1] == core["cpu"] - 1 and tuple(runs[-1][2:]) == key:
            runs[-1][1] = core["cpu"]
        else:
            runs.append([core["cpu"], core["cpu"], *key])
    parts = [f"cpu{a}" + (f"–{b}" if b > a else "") + (f" {khz / 1e6:.2f} GHz" if khz else "")
             + (f" **({tags})**" if tags else "") for a, b, khz, tags in runs]
    if not runs:
        return "unknown"
    return f"{len(cores)}: " + "; ".join(parts) + ("" if mask else " (not pinned: any core)")


def number(value: float | None, spec: str = ".2f") -> str:
    """A figure, or a dash for one the runner did not report."""
    return "—" if value is None else format(value, spec)


def median(latency: dict) -> str:
    """The median cell, marked when the runner printed only a mean (older benchmark_model builds)."""
    return number(latency["median"]) + (" (mean)" if latency.get("median_is_mean") else "")


def _table(results: list[dict], threads: list[str], ref: str) -> list[str]:
    header = ["file", "format", "precision", "input", "size MB", "threads", "min", "median", "mean", "p90", "p99", "std",
              "init ms",
              "first inference ms", "peak memory MB", "top-1", "top-5", "cosine", "PSNR dB", "parity",
              "ratio to fastest"]
    fastest = min(r["latency_by_threads"][ref]["median"] for r in results)
    rows = [header, ["---"] * len(header)]
    for r in results:
        p, memory = r["parity"], r.get("peak_memory_mb")
        for t in threads:
            lat = r["latency_by_threads"].get(t)
            if lat is None:
                continue
            rows.append([Path(r["file"]).name.replace("|", "\\|"), r["format"], r["precision"],
                         "×".join(map(str, r.get("input_shape") or ["?"])), f"{r['size_bytes'] / 1e6:.2f}", t,
                         number(lat["min"]), median(lat), number(lat.get("mean")), number(lat["p90"]),
                         number(lat["p99"]), number(lat["std"]), number(r["init_ms"], ".1f"),
                         number(r["first_inference_ms"], ".1f"), number(memory, ".1f"),
                         f"{p['top1_agreement']:.1%}", f"{p['top5_agreement']:.1%}", f"{p['cosine']:.7f}",
                         f"{p['psnr_db']:.1f}", "PASS" if p["passed"] else "**FAIL**",
                         f"{lat['median'] / fastest:.2f}×" if t == ref else ""])
    return ["| " + " | ".join(row) + " |" for row in rows]


def delegation_line(result: dict) -> str | None:
    """What XNNPACK took of a .tflite file on the device, e.g. `s.tflite: XNNPACK takes 250 of 250 nodes`,
    naming the ops it left; None for a file without delegation figures (ONNX)."""
    from exporters.tflite_inspect import delegation_text

    d = result.get("delegation")
    if not d or d.get("delegated") is None:
        return None
    return f"{Path(result['file']).name}: {delegation_text(d)}"


def _tolerance_lines(results: list[dict]) -> list[str]:
    """Per file: each tolerance with the value measured against it (the tolerance that would just have passed)."""
    lines = []
    for r in results:
        p = r["parity"]
        checks = [f"{name} {op} {limit:g} (measured {p[key]:{fmt}})"
                  for name, limit in p["tolerance"].items() for key, op, fmt in [TOLERANCE_MEASURES[name]]]
        verdict = "PASS" if p["passed"] else "**FAIL**"
        lines.append(f"- {Path(r['file']).name} ({r['precision']}, {p['samples']} samples): "
                     f"{', '.join(checks) or 'no tolerance'}: {verdict}")
    return lines


def _whiskers(lat: dict) -> tuple[float, float]:
    """p10..p90 of the raw timings, or min..p90 when a runner reports no raw timings."""
    if lat.get("raw"):
        lo, hi = np.percentile(lat["raw"], [10, 90])
        return float(lo), float(hi)
    return lat["min"], lat["p90"] if lat["p90"] is not None else lat.get("p95") or lat["median"]


def _plot_png(device: dict, results: list[dict]) -> bytes:
    """Two panels: median latency per file and thread count; parity against latency at the reference thread count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    threads, ref = _thread_counts(results)
    names = [Path(r["file"]).name for r in results]
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    bars, scatter = fig.subplots(1, 2, width_ratios=[3, 2])

    width = min(0.8 / len(threads), 0.3)
    x = np.arange(len(results))
    for i, t in enumerate(threads):
        lats = [r["latency_by_threads"].get(t) for r in results]
        pos = [xi + (i - (len(threads) - 1) / 2) * width for xi, lat in zip(x, lats) if lat]
        med = np.array([lat["median"] for lat in lats if lat])
        lo_hi = np.array([_whiskers(lat) for lat in lats if lat])
        err = np.clip([med - lo_hi[:, 0], lo_hi[:, 1] - med], 0, None)  # raw timings are rounded to 0.1 µs
        bars.bar(pos, med, width, yerr=err, capsize=3, label=f"{t} thread{'s' * (t != '1')}")
    many = len(results) > 4
    bars.set_xticks(x, names, rotation=20 if many else 0, ha="right" if many else "center", rotation_mode="anchor")
    bars.set_xlim(-0.7, len(results) - 0.3)
    raw = all(lat.get("raw") for r in results for lat in r["latency_by_threads"].values())
    bars.set_ylabel("median latency (ms), whiskers " + ("p10–p90" if raw else "p10–p90 or min–p90"))
    bars.set_title("latency per file and thread count")
    bars.legend()
    bars.grid(axis="y", alpha=0.3)

    _parity_panel(scatter, names, results, ref)

    title = f"{device.get('name', 'unknown device')}" + (f" ({device['model']})" if device.get("model") else "")
    fig.suptitle(title + (" (emulated)" if device.get("emulated") else ""), fontsize=13)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    return buf.getvalue()


def _parity_panel(ax, names: list[str], results: list[dict], ref: str) -> None:
    """Top-1 agreement (one precision) or 1 - cosine on a log scale (several) against median latency."""
    from matplotlib.ticker import PercentFormatter

    by_cosine = len({r["precision"] for r in results}) > 1
    xs = [r["latency_by_threads"][ref]["median"] for r in results]
    ys = [max(1 - r["parity"]["cosine"], 1e-12) if by_cosine else r["parity"]["top1_agreement"] for r in results]
    middle = (min(xs) + max(xs)) / 2
    for i, (name, r, x, y) in enumerate(zip(names, results, xs, ys)):
        passed = r["parity"]["passed"]
        ax.scatter(x, y, s=50, color="tab:blue" if passed else "tab:red", zorder=3)
        right = x <= middle  # labels point inwards so none leaves the panel
        ax.annotate(f"{name} ({r['precision']})" + ("" if passed else " FAIL"), (x, y),
                    xytext=(6 if right else -6, 6 if i % 2 == 0 else -12), textcoords="offset points",
                    ha="left" if right else "right", fontsize=9)
    if by_cosine:
        ax.set_yscale("log")
        ax.invert_yaxis()
        ax.set_ylabel("1 − lowest cosine to PyTorch (log, up is closer)")
    else:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("top-1 agreement with PyTorch")
    ax.set_xlabel(f"median latency at {ref} thread(s) (ms)")
    ax.margins(x=0.2, y=0.2 if by_cosine else 0)
    ax.set_title("parity vs latency (red: parity FAIL)")
    ax.grid(alpha=0.3)
