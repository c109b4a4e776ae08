"""Where every artifact of the chain lives, derived from params (one place, so DVC outs and flows agree)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATASETS = (
    "scone_single_candidate_base",
    "scone_single_candidate_refined",
    "scone_multi_candidate",
    "t2i_pretrain",  # text-to-image rows (no references): the base model's T2I competence, mixed into Stage I
    "und_pretrain",  # understanding rows (an image, questions, answers): the base model's understanding
    "und_heldout",  # the held-out understanding questions every checkpoint is scored on
    "sconeeval_bench",
    "srum_prompts",
    "mico",  # MICo-150K-style composition types (not in the default stage mixes; train on it by naming it)
    "mige_edit",  # MIGE-style subject addition / replacement with <imagehere> instructions
    "mico_bench",  # held-out MICo-Bench cases in its layout (data.heldout): every checkpoint is scored on them
    "mige_bench",  # held-out MIGE-Bench cases (subject addition, replacement) in its layout
)
HELDOUT_BENCHMARKS = ("mico", "mige")  # scored per checkpoint beside SconeEval: <scores>/<ckpt>/<b>/, <metrics>/<b>/

# Scone's recipe by role: the training stages (keys of params train.stages) the benchmarks start from or time
STAGE1_FINAL = "stage1_step2"  # the end of Stage I: every Stage II version of `scone bench ablation-stage2` starts here
STAGE2_FINAL = "stage2_step2"  # the Scone model (both experts after bridge guidance): sampled and timed by the benches


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
    def sconeeval_bench(self) -> Path:
        """The held-out benchmark (SconeEval layout: data.jsonl + images) under the data root."""
        return self.data / "sconeeval_bench"

    @property
    def srum_prompts(self) -> Path:
        """The SRUM rounds' compositional prompts (data.formats.srum_prompts) under the data root."""
        return self.data / "srum_prompts" / "prompts.jsonl"

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

    def understanding_metrics(self, name: str) -> Path:
        """One checkpoint's held-out understanding accuracy per question type, flat JSON: a DVC metrics file."""
        return self.metrics / "understanding" / f"{name}.json"

    def diagnostics_metrics(self, name: str) -> Path:
        """One checkpoint's diagnostics (bridge localisation AUC, self vs oracle judge agreement), flat JSON: a DVC
        metrics file (evaluation.diagnostics)."""
        return self.metrics / "diagnostics" / f"{name}.json"

    def diagnostics_dir(self, name: str) -> Path:
        """The diagnostics' pictures and per-case details, inside the checkpoint's scores folder."""
        return self.score_dir(name) / "diagnostics"

    def heldout_bench(self, benchmark: str) -> Path:
        """The held-out MICo-Bench (`mico`) or MIGE-Bench (`mige`) folder the data stage builds."""
        return self.data / f"{benchmark}_bench"

    def heldout_scores(self, name: str, benchmark: str) -> Path:
        """One checkpoint's results on MICo-Bench or MIGE-Bench, in that benchmark's layout."""
        return self.score_dir(name) / benchmark

    def heldout_metrics(self, name: str, benchmark: str) -> Path:
        """One checkpoint's MICo-Bench or MIGE-Bench figures, flat JSON: a DVC metrics file."""
        return self.metrics / benchmark / f"{name}.json"

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
