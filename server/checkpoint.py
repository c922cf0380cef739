"""Global-model checkpoints in the run folder, in the same saved-model format sites and tools read."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from torch import nn

from shared.config import RunConfig
from shared.durable_files import write_bytes_atomically
from shared.models.classifier import load_classifier, save_classifier
from shared.run_folder import RunFolder
from shared.weights import load_arrays_into, model_to_arrays


def array_record_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The named numpy arrays inside a Flower ArrayRecord."""
    return {name: array.numpy() for name, array in arrays.items()}


class CheckpointWriter:
    """Writes `checkpoints/round_NNN.pt` every round and `final_model.pt` at the end."""

    def __init__(self, run_folder: Path, model: nn.Module, run: RunConfig):
        self.layout = RunFolder(run_folder)
        self.folder = self.layout.checkpoints
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.run = run

    def _save(self, path: Path, arrays: ArrayRecord, metadata: dict) -> Path:
        load_arrays_into(self.model, array_record_to_numpy(arrays))
        save_classifier(
            path,
            self.model,
            model_name=self.run.model.name,
            classes=self.run.classes,
            preprocess=self.run.preprocess,
            metadata=metadata,
        )
        return path

    def round_path(self, server_round: int) -> Path:
        """Where the global model after `server_round` is kept."""
        return self.layout.checkpoint(server_round)

    def save_round(self, server_round: int, arrays: ArrayRecord) -> Path:
        """Checkpoint the global model after `server_round`."""
        return self._save(self.round_path(server_round), arrays, {"round": server_round})

    def load_round(self, server_round: int) -> ArrayRecord:
        """The global model's arrays after `server_round`, as checkpointed."""
        model, _ = load_classifier(self.round_path(server_round))
        return ArrayRecord({name: Array(value) for name, value in model_to_arrays(model).items()})

    def server_state_path(self, server_round: int) -> Path:
        """Where the server optimiser's state after `server_round` is kept (FedAvgM, FedAdam)."""
        return self.folder / f"server_optimiser_{server_round:03d}.npz"

    def save_server_state(self, server_round: int, state: dict[str, np.ndarray]) -> Path:
        """Keep the server optimiser's moments after `server_round`, so a resumed run continues them."""
        buffer = io.BytesIO()
        np.savez(buffer, **state)
        path = self.server_state_path(server_round)
        write_bytes_atomically(path, buffer.getvalue())
        return path

    def load_server_state(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The server optimiser's state after `server_round`, or None when the run kept none for it."""
        path = self.server_state_path(server_round)
        if not path.is_file():
            return None
        with np.load(path) as saved:
            return {name: saved[name] for name in saved.files}

    def save_final(self, arrays: ArrayRecord, metadata: dict) -> Path:
        """Write the final global model next to the run's history."""
        return self._save(self.layout.final_model, arrays, metadata)
