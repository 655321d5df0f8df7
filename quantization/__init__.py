"""mixdeploy: quantization step."""
