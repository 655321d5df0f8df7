"""mixdeploy: devices step."""
