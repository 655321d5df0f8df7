"""mixdeploy: exporters step."""
