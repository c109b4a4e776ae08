"""A training run's identity: what its result depends on, and whether `out_dir` already holds that run.

Every recipe (a Scone stage, model.train; a SRUM round, model.srum_train) writes its settings into
`out_dir/run_settings.json` before training and claims `out_dir` with `claim_run`:

- `out_dir` holds a finished run (`train_summary.json` beside the checkpoint's `config.json`) with the same
  settings: its summary is the answer, nothing trains;
- it holds a resumable one (`ds_state/latest`) with the same settings: the recipe resumes it;
- it holds a run (finished or resumable) with other settings: a stage refuses (`RunSettingsMismatch`: its work
  folder's state is the expensive thing, the caller decides), a SRUM round starts afresh (its out_dir is the
  round's checkpoint, retrained whenever the round's candidates or recipe change).

The settings name contents, not places or times: the code of the model package (`code_digest`), the init
checkpoint's weights (`weights_digest`), the data (each recipe digests its own).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Literal

from model.safe_state import file_digest

STATE_DIR = "ds_state"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
SETTINGS = "run_settings.json"
RUN_FILES = (STATE_DIR, SETTINGS)  # what in out_dir is how the run was made, not the model


class RunSettingsMismatch(RuntimeError):
    """out_dir holds a run (finished or resumable) made with other settings."""


def code_digest() -> str:
    """Digest of the model package's source: a resumed run must continue with the code that started it."""
    root = Path(__file__).resolve().parent
    return file_digest(sorted(root.rglob("*.py")))


def weights_digest(checkpoint: Path, prefix_bytes: int = 64 << 20) -> str:
    """Identity of a checkpoint's weights: retraining changes the leading bytes of every weight file, while a
    copy or a DVC checkout of the same file does not (unlike mtimes). Reads at most `prefix_bytes` per file."""
    h = hashlib.sha256()
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with f.open("rb") as fh:
            h.update(fh.read(prefix_bytes))
    return h.hexdigest()[:16]


def train_settings(train) -> dict:
    """The fields of a model.config.TrainConfig the result depends on."""
    # not: logging and checkpoint intervals, how the weights are computed or laid out on disk (recomputation, file
    # sizes), where the machines are (a recipe's settings hold the world size, which the result depends on) or
    # loader workers (batches are the same for any num_workers); a run may resume with other values of these
    return train.model_dump(mode="json", exclude={"stages", "num_ranks", "log_every", "save_every",
                                                  "activation_checkpointing", "max_shard_bytes",
                                                  "zero3_persistence_threshold", "nodes", "node_rank",
                                                  "rdzv_endpoint", "num_workers"})


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def settings_differences(out_dir: Path, settings: dict) -> list[str]:
    """How `settings` differ from those of the run `out_dir` holds (finished or resumable); [] if it holds none."""
    path = Path(out_dir) / SETTINGS
    started = (Path(out_dir) / SUMMARY).exists() or (Path(out_dir) / STATE_DIR / "latest").exists()
    if not (started and path.exists()):
        return []
    return _differences(json.loads(path.read_text()), settings)


def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to resume or re-use a run of `out_dir` made with other settings."""
    diff = settings_differences(out_dir, settings)
    if diff:
        raise RunSettingsMismatch(
            f"{out_dir} holds a run with other settings ({'; '.join(diff)}); "
            f"delete {out_dir} to train from scratch, or choose another output directory"
        )


def finished_summary(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / SUMMARY
    if path.exists() and (Path(out_dir) / "config.json").exists():
        return json.loads(path.read_text())
    return None


def claim_run(out_dir: Path, settings: dict, rank: int, *,
              on_mismatch: Literal["refuse", "restart"] = "refuse") -> dict | None:
    """Claim `out_dir` for the run of `settings` on every rank: the finished run's summary if it holds it (nothing
    to train), else None after rank 0 has written the settings (train, resuming any state of the same run).

    A run of other settings in out_dir is refused ("refuse": RunSettingsMismatch) or its summary, metrics and
    resumable state are removed by rank 0 ("restart"; the weights are replaced by the final save)."""
    if on_mismatch == "refuse":
        check_settings(out_dir, settings)
    elif settings_differences(out_dir, settings):
        import torch.distributed as dist

        dist.barrier()  # every rank has seen the mismatch before rank 0 removes what made it
        if rank == 0:
            shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
            for name in (SUMMARY, METRICS):
                (out_dir / name).unlink(missing_ok=True)
        dist.barrier()
    done = finished_summary(out_dir)
    if done is not None:
        return done
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out_dir / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return None
