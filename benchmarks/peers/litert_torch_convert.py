"""Runs inside the litert-torch environment: convert a timm model with given weights to .tflite (NHWC io).

    python litert_torch_convert.py MODEL WEIGHTS.pt OUT.tflite [--int8 CALIB.npy]
"""
import sys

import litert_torch
import timm
import torch

name, weights, out = sys.argv[1:4]
model = timm.create_model(name).eval()
model.load_state_dict(torch.load(weights, weights_only=True))
model = litert_torch.to_channel_last_io(model, args=[0]).eval()
litert_torch.convert(model, (torch.randn(1, 224, 224, 3),)).export(out)
