"""mixdeploy vs every peer, fp32 and int8, through `mixdeploy bench --compare-peers` on this machine.

    bash benchmarks/peers/setup.sh && python benchmarks/bench_peers.py [--models mixnet_s,mixnet_m,mixnet_l]

One compare-peers run per model and precision (ONNX Runtime and LiteRT files side by side, at 1
and 2 threads, parity on the shipped photos; random-init weights with BatchNorm calibrated on the
photos). Writes benchmarks/results/CPU/peers.json (peers_FILE.json for own networks, such as
benchmarks/own_mixnet.py:build) and prints a Markdown table.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import save_result  # noqa: E402
from benchmarks.timing import arguments  # noqa: E402
from devices.bench import Settings  # noqa: E402
from devices.compare_peers import compare_peers  # noqa: E402
from devices.connect import open_device  # noqa: E402
from mixnet_deploy.models import own_network  # noqa: E402


def main() -> None:
    args = arguments(__doc__)
    runs = []
    for name in args.models.split(","):
        for precision in ("fp32", "int8"):
            settings = Settings([int(t) for t in args.threads.split(",")], runs=40 * args.rounds, warmup=10)
            measured = compare_peers(name, open_device("local"), settings, precision, calibrate_bn=True,
                                     step=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
            runs.append(measured)
            for r in measured["results"]:
                print(f"{name} {precision} {r['source']} {r['format']}: {r['latency_ms']['median']:.2f} ms "
                      f"({r['ratio_to_ours']:.2f}x ours), parity {'PASS' if r['parity']['passed'] else 'FAIL'}",
                      flush=True)
    own = [found for name in args.models.split(",") if (found := own_network(name))]  # results of their own
    save_result("peers" if not own else "peers_" + "_".join(
        Path(source).stem if source.endswith(".py") else source.replace(".", "_") for source, _ in own), runs=runs)
    print("\n| model | precision | exported by | format | MB | threads | median ms | vs ours | top-1 agr. | parity |"
          "\n|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for r in run["results"]:
            for threads, lat in r["latency_by_threads"].items():
                ours = next(o for o in run["results"] if o["source"] == "mixdeploy" and o["format"] == r["format"])
                ratio = lat["median"] / ours["latency_by_threads"][threads]["median"]
                print(f"| {run['model']['name']} | {run['model']['precision']} | {r['source']} | {r['format']} | "
                      f"{r['size_bytes'] / 1e6:.1f} | {threads} | {lat['median']:.2f} | {ratio:.2f}x | "
                      f"{r['parity']['top1_agreement']:.0%} | {'PASS' if r['parity']['passed'] else 'FAIL'} |")
        for label, why in run["missing_peers"].items():  # a peer that is not here, or failed, says so
            print(f"| {run['model']['name']} | {run['model']['precision']} | {label} | | | | | | | {why} |")


if __name__ == "__main__":
    main()
