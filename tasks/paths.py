"""The tasks' view of the artifact map: data.layout.ArtifactLayout (the one map; the dashboards read it too) built
from params, plus what only params can tell (the release a chain starts from, the checkpoints it makes) and the
recipe's roles of the training stages."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data.layout import DATASETS, HELDOUT_BENCHMARKS, ArtifactLayout, srum_name

if TYPE_CHECKING:  # a type only: loading the root params pulls in every package's config
    from tasks.params import Params

__all__ = ["DATASETS", "HELDOUT_BENCHMARKS", "STAGE1_FINAL", "STAGE2_FINAL", "Paths", "checkpoint_names", "srum_name"]

# Scone's recipe by role: the training stages (keys of params train.stages) the benchmarks start from or time
STAGE1_FINAL = "stage1_step2"  # the end of Stage I: every Stage II version of `scone bench ablation-stage2` starts here
STAGE2_FINAL = "stage2_step2"  # the Scone model (both experts after bridge guidance): sampled and timed by the benches


@dataclass(frozen=True)
class Paths(ArtifactLayout):
    """data.layout's map of the artifacts root `pipeline.artifacts` and the data root `data.root`."""

    @classmethod
    def from_params(cls, params: Params) -> Paths:
        return cls(root=Path(params.pipeline.artifacts), data=Path(params.data.root))

    def release(self, params: Params) -> Path:
        """The release directory the first training stage starts from: model.release, else the chain's own."""
        if params.model.release:
            return Path(params.model.release)
        return self.bootstrap / params.model.preset


def checkpoint_names(params: Params) -> list[str]:
    """Every checkpoint the chain produces, in order: the training stages, then the SRUM rounds."""
    return list(params.pipeline.stage_order) + list(params.srum.rounds)
