"""The `mixdeploy` command: parse arguments, call the Python API, render a table or JSON."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click
from rich.console import Console
from rich.table import Table

from mixnet_deploy.errors import MixdeployError

out = Console(width=None if sys.stdout.isatty() else 120)


def model_options(fn):
    """MODEL plus the options that say which weights to load."""
    fn = click.option("--pretrained", is_flag=True, help="Download timm's pretrained weights (needs the internet).")(fn)
    fn = click.option("--checkpoint", type=click.Path(), help="Local weights (.pth/.pt/.safetensors) for MODEL.")(fn)
    return click.argument("model")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mixdeploy")
def cli() -> None:
    """Export MixNet classifiers to ONNX and TFLite, quantize them, benchmark them on devices."""


@cli.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def info(model: str, checkpoint: str | None, pretrained: bool, as_json: bool) -> None:
    """Parameters, multiply-adds, input config and MixConv layers of MODEL."""
    from mixnet_deploy import count, load_model

    loaded = load_model(model, checkpoint, pretrained)
    stats = count(loaded.module, loaded.preprocess.input_size)
    if as_json:
        report = {
            "model": loaded.name, "weights": loaded.weights, "params": stats.params, "macs": stats.macs,
            "conv_macs": stats.conv_macs, "preprocess": loaded.preprocess.to_dict(),
            "num_classes": loaded.module.num_classes, "labels": "imagenet-1k" if loaded.labels else None,
            "mixconv_layers": [asdict(layer) for layer in stats.mixconv_layers],
        }
        click.echo(json.dumps(report, indent=2))
        return
    pre = loaded.preprocess
    weights = "random-init (pass --pretrained or --checkpoint for trained weights)" if loaded.random_init else loaded.weights
    out.print(f"[bold]{loaded.name}[/]  weights: {weights}")
    out.print(f"params {stats.params / 1e6:.2f} M   MACs {stats.macs / 1e6:.1f} M (conv+linear {stats.conv_macs / 1e6:.1f} M)")
    out.print(
        f"input {pre.input_size}  mean {pre.mean}  std {pre.std}  crop_pct {pre.crop_pct}  "
        f"interpolation {pre.interpolation}  classes {loaded.module.num_classes}"
    )
    table = Table(title="MixConv layers")
    for col in ("layer", "kind", "channels", "kernels", "stride", "MACs (M)"):
        table.add_column(col, no_wrap=True)
    for layer in stats.mixconv_layers:
        kernels = ",".join(f"{k}" + (f"d{d}" if d > 1 else "") for k, d in zip(layer.kernel_sizes, layer.dilation))
        table.add_row(layer.name, layer.kind, ",".join(map(str, layer.channels)), kernels, str(layer.stride), f"{layer.macs / 1e6:.2f}")
    out.print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage and input errors become one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, prog_name="mixdeploy", standalone_mode=False)
    except MixdeployError as exc:
        click.echo(f"mixdeploy: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("mixdeploy: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"mixdeploy: error: {exc.format_message()} (see mixdeploy --help)", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
