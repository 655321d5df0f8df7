"""mixdeploy: quantization step."""

# calibration images by default (quantize --num-calib, compare-peers' int8 files); here, so that the
# CLI reads it without loading PyTorch
NUM_CALIB = 100
