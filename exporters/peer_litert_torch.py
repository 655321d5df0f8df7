"""Runs inside the litert-torch environment (exporters/peers.py starts it): convert a timm model, a
MixConv drop-in (mixconv_ + a timm name), or the user's own network (FILE.py:FACTORY or
MODULE:FACTORY), with given weights to .tflite with NHWC io.

    python peer_litert_torch.py MODEL WEIGHTS.pt OUT.tflite [CHANNELS HEIGHT WIDTH]
"""
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # mixdeploy's folder: its drop-ins need only torch and timm


def build(name: str, state: dict) -> torch.nn.Module:
    """The model NAME names, of the classes its weights have. (mixnet_deploy.own_network imports an own
    network the same way; this environment has not installed mixdeploy: a drop-in comes from ROOT.)"""
    if ":" not in name:
        import timm

        sys.path.append(str(ROOT))
        from mixnet_deploy.dropin import PREFIX, create_dropin

        build_model = create_dropin if name.startswith(PREFIX) else timm.create_model
        return build_model(name, num_classes=state["classifier.weight"].shape[0])
    source, factory = name.rsplit(":", 1)
    if source.endswith(".py"):  # its folder importable, for its sibling modules, as mixdeploy has it
        sys.path.insert(0, str(Path(source).parent))
        spec = importlib.util.spec_from_file_location(f"peer_own_{Path(source).stem}", source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses with postponed annotations look their module up
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(source)
    return getattr(module, factory)()


def main() -> None:
    import litert_torch

    name, weights, out = sys.argv[1:4]
    channels, height, width = (int(v) for v in sys.argv[4:7]) if len(sys.argv) > 6 else (3, 224, 224)
    state = torch.load(weights, weights_only=True)
    model = build(name, state).eval()
    model.load_state_dict(state)
    model = litert_torch.to_channel_last_io(model, args=[0]).eval()
    litert_torch.convert(model, (torch.randn(1, height, width, channels),)).export(out)


if __name__ == "__main__":
    main()
