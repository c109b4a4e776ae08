"""Training state in, without executing anything stored in it.

DeepSpeed saves its resumable state with `torch.save` (pickles) and loads it with `torch.load(weights_only=False)`,
which runs whatever a crafted file tells the unpickler to run. The state travels with the artifacts (and could
travel through a DVC cache or remote), so it is untrusted input: we swap the engine's checkpoint loader for one
that unpickles weights-only, with an allow-list of the few plain DeepSpeed classes its state holds. A file that
needs anything else is refused with an error naming it.
"""
from __future__ import annotations

import hashlib
import pickle
from functools import lru_cache
from pathlib import Path

import torch


class UnsafeCheckpointError(RuntimeError):
    """A training-state file asks the unpickler for code outside the allow-list."""


def _allowed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # What DeepSpeed's ZeRO 0-3 optimizer states hold besides tensors (checked on fp32 and bf16 engines).
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None):
    """torch.load restricted to tensors, containers and the allow-list."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).split("\n\n")[0].split("Please use")[0].strip()
        raise UnsafeCheckpointError(
            f"{path}: refused to load training state that asks to run code outside the allow-list ({first}). "
            f"The file is not what DeepSpeed writes: delete the stage's working folder (ds_state/) and train again."
        ) from None


def _weights_only_engine():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return WeightsOnlyCheckpointEngine


def load_engine_state(engine, state_dir: str | Path):
    """`engine.load_checkpoint(state_dir)` with the weights-only loader; returns (path, client_state)."""
    cls = _weights_only_engine()
    current = engine.checkpoint_engine
    if not isinstance(current, cls):
        safe = cls.__new__(cls)
        safe.__dict__.update(current.__dict__)  # keep the engine's own settings (serialization, name)
        engine.checkpoint_engine = safe
    return engine.load_checkpoint(str(state_dir))


@lru_cache(maxsize=4096)
def _content_sha(path: str, size: int, mtime_ns: int) -> bytes:
    # keyed by size and mtime too: a rewritten file is read again; the launcher and the trainer of one stage, and
    # later stages on the same shards, read each file once per process
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def file_digest(files) -> str:
    """sha256 over the names and contents of `files` (a content identity, unlike sizes or mtimes)."""
    h = hashlib.sha256()
    for f in map(Path, files):
        st = f.stat()
        h.update(f"{f.name}\0".encode())
        h.update(_content_sha(str(f.resolve()), st.st_size, st.st_mtime_ns))
    return h.hexdigest()[:20]
