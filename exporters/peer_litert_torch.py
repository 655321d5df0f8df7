"""Runs inside the litert-torch environment (exporters/peers.py starts it): convert a timm model
with given weights to .tflite with NHWC io.

    python peer_litert_torch.py MODEL WEIGHTS.pt OUT.tflite [HEIGHT WIDTH]
"""
import sys

import litert_torch
import timm
import torch

name, weights, out = sys.argv[1:4]
height, width = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (224, 224)
state = torch.load(weights, weights_only=True)
model = timm.create_model(name, num_classes=state["classifier.weight"].shape[0]).eval()
model.load_state_dict(state)
model = litert_torch.to_channel_last_io(model, args=[0]).eval()
litert_torch.convert(model, (torch.randn(1, height, width, 3),)).export(out)
