"""Where every artifact of the chain lives: the one map of `artifacts/`, read by the steps that write there
(tasks.paths.Paths is this map built from params), the data stage's own writers (data cards, validation) and the
dashboards that show it all.

It lives in data/, the bottom package, because the lowest code that needs it is here: data.card, data.validate and
data.quarantine place their outputs beside the data root. Every package above can import it; it imports nothing of
the project but data.catalog's dataset names, so reading it costs nothing. The dashboards (below tasks/, so they
cannot import tasks.paths) take their paths from it instead of guessing among layouts.

    <root>/                        pipeline.artifacts (params), `artifacts` by default
      checkpoints/<name>/          a release directory per checkpoint; metrics.jsonl: its training log
      scores/<name>/<name>/        SconeEval's output (evaluation.runner): summary.json, images_try1/, ...
      scores/<name>/{mico,mige}/   the held-out benchmarks' output; diagnostics/: evaluation.diagnostics'
      metrics/                     flat JSON DVC metrics and plots files (sconeeval/, loss/, leaderboard.json, ...)
      srum/srum_roundK/            a SRUM round's candidates, rewards and summary
      reports/index.html           the HTML report (dashboards.report)
      bench/<name>.json            `scone bench NAME`
      release/                     the release the chain bootstraps (tokenizer/, autoencoder/, <preset>/)
      work/                        resumable working state, outside every DVC output
    <data>/                        data.root (params), `<root>/data` by default: datasets and benchmarks
    <data>/../validation/          the validate stage: <name>.json per dataset, gx/ (the Great Expectations project)
    <data>/../datacards/<name>/    data.card: card.json, contact_sheet.png
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.catalog import ALL_DATASETS

# every dataset the chain builds, in build order: data.catalog's names, the folders under the data root
DATASETS = ALL_DATASETS
HELDOUT_BENCHMARKS = ("mico", "mige")  # scored per checkpoint beside SconeEval: <scores>/<ckpt>/<b>/, <metrics>/<b>/

DEFAULT_DATA = "data"  # data.root relative to the artifacts root when nobody says otherwise (the defaults of both)
TRAIN_LOG = "metrics.jsonl"  # a checkpoint's training log (model.train.METRICS, model.srum_train.METRICS)
SUMMARY = "summary.json"  # what evaluation.runner, the held-out runner and a SRUM round write last
CARD = "card.json"  # data.card's files in a dataset's card folder
CONTACT_SHEET = "contact_sheet.png"
DATA_DOCS_SITE = "local_site"  # data.validate's Great Expectations Data Docs site


def validation_dir(data_root: str | Path) -> Path:
    """The validate stage's folder for data root `data_root`: beside it, its own DVC output."""
    return Path(data_root).parent / "validation"


def datacards_dir(data_root: str | Path) -> Path:
    """The data cards of the datasets under `data_root` (data.card), one folder per dataset."""
    return Path(data_root).parent / "datacards"


def srum_name(round_index: int) -> str:
    # the names srum.rounds is keyed by (model.config.SrumConfig validates them); spelled out here so the data
    # steps, which use this map too, do not depend on the model package
    return f"srum_round{round_index}"


@dataclass(frozen=True)
class ArtifactLayout:
    """The paths under an artifacts root `root` and a data root `data` (tasks.paths.Paths.from_params reads both
    from params; `at` assumes the default data root under `root`)."""

    root: Path
    data: Path

    @classmethod
    def at(cls, root: str | Path, data: str | Path | None = None) -> "ArtifactLayout":
        root = Path(root)
        return cls(root=root, data=Path(data) if data is not None else root / DEFAULT_DATA)

    # ------------------------------------------------------------------ the folders under the artifacts root

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
    def report_page(self) -> Path:
        """The HTML report (dashboards.report), its pictures beside it."""
        return self.reports / "index.html"

    @property
    def srum(self) -> Path:
        return self.root / "srum"

    @property
    def bench(self) -> Path:
        return self.root / "bench"

    def bench_result(self, name: str) -> Path:
        """What `scone bench NAME` writes (benchmarks/), unless told another place."""
        return self.bench / f"{name}.json"

    @property
    def work(self) -> Path:
        """Resumable working state (DeepSpeed optimizer state, worker logs): outside every DVC output."""
        return self.root / "work"

    def train_work(self, stage: str) -> Path:
        return self.work / "train" / stage

    @property
    def bootstrap(self) -> Path:
        """The parts of a release the chain makes itself: tokenizer/, autoencoder/ (model.bagel.bootstrap)."""
        return self.root / "release"

    @property
    def registry_records(self) -> Path:
        return self.metrics / "registry"

    @property
    def leaderboard(self) -> Path:
        """Every checkpoint's headline scores in chain order: a DVC plots file (`dvc plots show`, a bar chart)."""
        return self.metrics / "leaderboard.json"

    # ------------------------------------------------------------------ one checkpoint's files

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    def train_log(self, name: str) -> Path:
        """A checkpoint's training log, one JSON object per logged step: a training stage's or a SRUM round's."""
        return self.checkpoint(name) / TRAIN_LOG

    def trained(self) -> list[str]:
        """The checkpoints on disk that have a training log, by name (registered or not)."""
        return sorted(p.parent.name for p in self.checkpoints.glob(f"*/{TRAIN_LOG}"))

    def loss_curve(self, name: str) -> Path:
        """Training curve of one checkpoint as a JSON list of rows: a DVC plots file (`dvc plots show`)."""
        return self.metrics / "loss" / f"{name}.json"

    def score_dir(self, name: str) -> Path:
        return self.scores / name

    def sconeeval_dir(self, name: str) -> Path:
        """SconeEval's output for checkpoint `name` (evaluation.runner's <out>/<model_name>/, model_name = name)."""
        return self.score_dir(name) / name

    def sconeeval_summary(self, name: str) -> Path:
        """SconeEval's aggregate of checkpoint `name`, with the sample images it lists."""
        return self.sconeeval_dir(name) / SUMMARY

    def t2i_scores(self, name: str) -> Path:
        """The compositional T2I accuracy of checkpoint `name` (the evaluate step)."""
        return self.score_dir(name) / "t2i.json"

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

    def heldout_scores(self, name: str, benchmark: str) -> Path:
        """One checkpoint's results on MICo-Bench or MIGE-Bench, in that benchmark's layout."""
        return self.score_dir(name) / benchmark

    def heldout_metrics(self, name: str, benchmark: str) -> Path:
        """One checkpoint's MICo-Bench or MIGE-Bench figures, flat JSON: a DVC metrics file."""
        return self.metrics / benchmark / f"{name}.json"

    def srum_round(self, index: int) -> Path:
        """Round k's candidates, rewards and summary: <srum>/srum_roundK, named like its checkpoint."""
        return self.srum / srum_name(index)

    # ------------------------------------------------------------------ under (and beside) the data root

    @property
    def sconeeval_bench(self) -> Path:
        """The held-out benchmark (SconeEval layout: data.jsonl + images) under the data root."""
        return self.data / "sconeeval_bench"

    @property
    def srum_prompts(self) -> Path:
        """The SRUM rounds' compositional prompts (data.formats.srum_prompts) under the data root."""
        return self.data / "srum_prompts" / "prompts.jsonl"

    def heldout_bench(self, benchmark: str) -> Path:
        """The held-out MICo-Bench (`mico`) or MIGE-Bench (`mige`) folder the data stage builds."""
        return self.data / f"{benchmark}_bench"

    @property
    def validation(self) -> Path:
        return validation_dir(self.data)

    def validation_report(self, dataset: str) -> Path:
        """A dataset's validation verdict (the validate step)."""
        return self.validation / f"{dataset}.json"

    def validation_reports(self) -> list[Path]:
        """Every dataset's validation verdict, by dataset name."""
        return sorted(self.validation.glob("*.json"))

    @property
    def gx_project(self) -> Path:
        """The file-backed Great Expectations project of the validate stage (data.validate.gx_project_dir)."""
        return self.validation / "gx"

    @property
    def data_docs_index(self) -> Path:
        """The Great Expectations Data Docs of the validate stage (GX keeps its files in <project>/gx)."""
        return self.gx_project / "uncommitted" / "data_docs" / DATA_DOCS_SITE / "index.html"

    @property
    def datacards(self) -> Path:
        return datacards_dir(self.data)

    def datacard(self, dataset: str) -> Path:
        return self.datacards / dataset

    def datacard_names(self) -> list[str]:
        """The datasets that have a data card, by name."""
        return sorted(p.parent.name for p in self.datacards.glob(f"*/{CARD}"))
