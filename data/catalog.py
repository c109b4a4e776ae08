"""The datasets the data package builds: their names and groups (one place, read by the builder, the per-dataset
case makers data.mico / data.mige / data.t2i, validation and quarantine; none of them imports another for it)."""
from __future__ import annotations

BASE = "scone_single_candidate_base"
REFINED = "scone_single_candidate_refined"
MULTI = "scone_multi_candidate"
BENCH = "sconeeval_bench"
SRUM = "srum_prompts"
MICO = "mico"
MIGE = "mige_edit"
T2I = "t2i_pretrain"
UND = "und_pretrain"  # understanding rows (data.understanding), taught first in the chain (stage und_pretrain)
UND_HELDOUT = "und_heldout"  # the held-out understanding questions every checkpoint is scored on
S2I_DATASETS = (BASE, REFINED, MULTI, MICO, MIGE, T2I, UND, UND_HELDOUT)
DATASETS = (BASE, REFINED, MULTI, T2I, UND, UND_HELDOUT, BENCH, SRUM)  # the chain (tasks/paths.py DATASETS)
EXTRA_DATASETS = (MICO, MIGE)  # built on request: MICo-150K and MIGE coverage of the subject world
MICO_BENCH = "mico_bench"  # held-out MICo-Bench cases in its layout (data.heldout, data.formats.mico_bench)
MIGE_BENCH = "mige_bench"  # held-out MIGE-Bench cases in its layout (data.heldout, data.formats.mige_bench)
HELDOUT_BENCHES = (MICO_BENCH, MIGE_BENCH)
ALL_DATASETS = (*DATASETS, *EXTRA_DATASETS, *HELDOUT_BENCHES)


def min_images_of(name: str) -> int:
    """Images a row of dataset `name` holds at least: references and the target; T2I rows have the target only,
    understanding rows their one image."""
    return 1 if name in (T2I, UND, UND_HELDOUT) else 2
