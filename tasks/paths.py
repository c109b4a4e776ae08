"""Where every artifact of the chain lives, derived from params (one place, so DVC outs and flows agree)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATASETS = (
    "scone_single_candidate_base",
    "scone_single_candidate_refined",
    "scone_multi_candidate",
    "t2i_pretrain",  # text-to-image rows (no references): the base model's T2I competence, mixed into Stage I
    "sconeeval_bench",
    "srum_prompts",
    "mico",  # MICo-150K-style composition types (not in the default stage mixes; train on it by naming it)
    "mige_edit",  # MIGE-style subject addition / replacement with <imagehere> instructions
)


@dataclass(frozen=True)
class Paths:
    root: Path
    data: Path

    @classmethod
    def from_params(cls, params) -> "Paths":
        return cls(root=Path(params.pipeline.artifacts), data=Path(params.data.root))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def srum(self) -> Path:
        return self.root / "srum"

    @property
    def bench(self) -> Path:
        return self.root / "bench"

    @property
    def work(self) -> Path:
        """Resumable working state (DeepSpeed optimizer state, worker logs): outside every DVC output."""
        return self.root / "work"

    @property
    def bootstrap(self) -> Path:
        """The parts of a release the chain makes itself: tokenizer/, autoencoder/ (model.bagel.bootstrap)."""
        return self.root / "release"

    def release(self, params) -> Path:
        """The release directory the first training stage starts from: model.release, else the chain's own."""
        if params.model.release:
            return Path(params.model.release)
        return self.bootstrap / params.model.preset

    def train_work(self, stage: str) -> Path:
        return self.work / "train" / stage

    @property
    def registry_records(self) -> Path:
        return self.metrics / "registry"

    def score_metrics(self, name: str) -> Path:
        """Headline scores of one checkpoint, flat JSON: a DVC metrics file (`dvc metrics show|diff`, `dvc exp show`)."""
        return self.metrics / "sconeeval" / f"{name}.json"

    @property
    def leaderboard(self) -> Path:
        """Every checkpoint's headline scores in chain order: a DVC plots file (`dvc plots show`, a bar chart)."""
        return self.metrics / "leaderboard.json"

    def loss_curve(self, name: str) -> Path:
        """Training curve of one checkpoint as a JSON list of rows: a DVC plots file (`dvc plots show`)."""
        return self.metrics / "loss" / f"{name}.json"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    def srum_round(self, index: int) -> Path:
        """Round k's candidates, rewards and summary: <srum>/srum_roundK, named like its checkpoint."""
        return self.srum / srum_name(index)

    def score_dir(self, name: str) -> Path:
        return self.scores / name


def srum_name(round_index: int) -> str:
    # the names srum.rounds is keyed by (model.config.SrumConfig validates them); spelled out here so the data
    # steps, which use this map too, do not depend on the model package
    return f"srum_round{round_index}"


def checkpoint_names(params) -> list[str]:
    """Every checkpoint the chain produces, in order: the training stages, then the SRUM rounds."""
    return list(params.pipeline.stage_order) + list(params.srum.rounds)
