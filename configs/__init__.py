"""ml_collections config files: `--config=configs/<file>.py:key=value,...`."""
