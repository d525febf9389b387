"""DeepSpeed's checkpoint engine for lm2: DeepSpeed saves and loads every model and optimizer file through its
engine's `save` and `load`, and lm2 replaces that engine (build_engine) with one that

- loads through safe_load.load (weights_only with lm2's allowlist): a resumed checkpoint runs no code;
- records the files it saved, so that each rank reports exactly what it wrote to the manifest (save.py), rather
  than rank 0 listing a folder that a network file system may show it stale.
"""

from __future__ import annotations

from pathlib import Path

from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from lm2.pipeline.checkpoint import safe_load


class CheckedCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params=None) -> None:
        super().__init__(config_params)
        self.saved: list[Path] = []
        """Files saved since the last take_saved()."""

    def save(self, state_dict, path: str) -> None:
        super().save(state_dict, path)
        self.saved.append(Path(path))

    def load(self, path: str, map_location=None):
        return safe_load.load(path, map_location)

    def take_saved(self) -> list[Path]:
        saved, self.saved = self.saved, []
        return saved


def install(ds_engine) -> CheckedCheckpointEngine:
    """Replaces a DeepSpeed engine's checkpoint engine (made by deepspeed.initialize) with lm2's."""
    ds_engine.checkpoint_engine = CheckedCheckpointEngine(ds_engine._config)
    return ds_engine.checkpoint_engine
