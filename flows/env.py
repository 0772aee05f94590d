"""Environment defaults for offline, quiet runs. Imported before prefect, ray or transformers."""
import os
from pathlib import Path

_DEFAULTS = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a loaded 2-core machine can take a minute
    "PREFECT_HOME": str(Path.home() / ".pairforge" / "prefect"),
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "0",
}


def apply() -> None:
    for k, v in _DEFAULTS.items():
        os.environ.setdefault(k, v)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


apply()
