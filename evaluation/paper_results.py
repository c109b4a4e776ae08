"""The Scone, MICo-150K and MIGE papers' published benchmark numbers: the context rows of this project's SconeEval,
OmniContext, MICo-Bench and MIGE-Bench tables and of the report's leaderboards. Data only (no imports): the one place
they are written down; evaluation.sconeeval, evaluation.omnicontext, evaluation.mico and evaluation.migebench format
tables with them, dashboards.report shows them.

They are not comparable with our rows figure for figure: the papers judge 1024 px photographs with GPT / Qwen-VL
and ArcFace (MICo) or DINO / CLIP features (MIGE); we judge 32 px renders of the subject world with the oracle.
"""
from __future__ import annotations

# Scone Table 3 (SconeEval, GPT-4.1 judge, 1024 px), in evaluation.sconeeval.TABLE3_COLUMNS order (registry's too):
# COM of the two composition tasks, COM and DIS of the four distinction tasks, average COM, DIS and Overall.
SCONE_TABLE3: dict[str, tuple[float | None, ...]] = {
    "GPT-4o": (8.92, 8.51, 9.18, 8.55, 9.45, 9.01, 8.83, 8.49, 8.99, 9.56, 8.98, 8.90, 8.94),
    "Gemini-2.5-Flash-Image": (8.87, 7.94, 9.12, 9.15, 9.00, 8.50, 8.27, 8.87, 8.17, 8.85, 8.56, 8.84, 8.70),
    "Qwen-Image-Edit-2509": (8.54, 6.85, 8.85, 8.57, 7.32, 6.86, 7.53, 8.13, 7.49, 7.02, 7.76, 7.65, 7.70),
    "BAGEL": (7.14, 5.55, 7.49, 7.95, 6.93, 6.21, 6.44, 7.38, 6.87, 7.27, 6.74, 7.20, 6.97),
    "OmniGen2": (8.00, 6.59, 8.31, 8.99, 6.99, 6.80, 7.28, 8.30, 7.14, 7.13, 7.39, 7.81, 7.60),
    "Echo-4o": (8.58, 7.73, 8.36, 8.33, 7.74, 7.18, 7.87, 8.72, 8.01, 8.33, 8.05, 8.14, 8.09),
    "Scone": (8.52, 7.40, 8.98, 9.73, 7.97, 7.74, 8.20, 9.25, 8.21, 8.44, 8.21, 8.79, 8.50),
}

# Scone Table 2 (OmniContext, GPT-4.1 judge): overall per category in evaluation.omnicontext.CATEGORIES order, then
# the Average.
SCONE_TABLE2: dict[str, tuple[float | None, ...]] = {
    "Gemini-2.5-Flash-Image": (8.79, 9.12, 8.27, 8.60, 7.71, 7.63, 7.65, 6.81, 8.07),
    "GPT-4o": (8.96, 8.91, 8.90, 8.95, 8.81, 8.92, 8.40, 8.44, 8.78),
    "FLUX.1 Kontext [dev]": (8.07, 7.97, None, None, None, None, None, None, None),
    "UNO": (7.15, 6.72, 3.56, 6.46, 4.90, 2.72, 4.89, 4.76, 5.14),
    "USO": (8.03, 7.55, 3.32, 6.10, 4.56, 2.77, 5.38, 5.09, 5.35),
    "UniWorld-V2": (8.45, 8.44, 7.87, 8.22, 7.95, 5.36, 7.47, 6.98, 7.59),
    "Qwen-Image-Edit-2509": (8.56, 8.41, 7.92, 8.37, 7.79, 5.23, 7.70, 6.86, 7.60),
    "BAGEL": (7.00, 7.04, 5.32, 6.69, 6.74, 3.94, 5.77, 5.73, 6.03),
    "OmniGen2": (8.17, 7.63, 7.26, 7.03, 7.56, 7.02, 6.90, 6.64, 7.28),
    "Echo-4o": (8.34, 8.27, 8.13, 8.14, 8.11, 7.07, 7.73, 7.77, 7.95),
    "Scone": (8.34, 8.52, 8.24, 8.14, 8.30, 7.06, 7.88, 7.63, 8.01),
}

# MICo-150K Table 2 (released MICo-Bench, 897 cases, Weighted-Ref-VIEScore 0-100), the "base" checkpoints and the
# closed-source systems: Overall, Object, Person, HOI, De&Re.
MICO_TABLE2_COLUMNS = ("Overall", "Object", "Person", "HOI", "De&Re")
MICO_TABLE2: dict[str, tuple[float, ...]] = {
    "BLIP3-o": (2.2, 3.2, 2.1, 2.1, 1.2),
    "DiMOO": (4.3, 3.8, 1.3, 6.5, 1.8),
    "BAGEL": (19.3, 24.4, 22.4, 12.9, 34.2),
    "Qwen-Image": (24.9, 39.4, 17.8, 20.0, 27.1),
    "OmniGen2": (31.4, 44.2, 22.0, 27.4, 36.4),
    "GPT-4o": (47.1, 48.5, 36.2, 47.6, 50.3),
    "Nano-Banana": (47.8, 48.0, 41.8, 49.6, 49.4),
}

# MIGE Table 3 (MIGEBench, 500 + 500 cases): per edit type, editing (DINO and CLIP-I against the ground-truth edit,
# CLIP-T against the target caption) and subject preservation (DINO and CLIP-I of the extracted subject against the
# input subject image). None: not reported ("source-target" compares the unedited source with the target).
MIGE_TABLE3_COLUMNS = ("DINO", "CLIP-I", "CLIP-T", "subject DINO", "subject CLIP-I")
MIGE_TABLE3: dict[str, dict[str, tuple[float | None, ...]]] = {
    "source-target": {"replacement": (0.668, 0.842, 0.271, None, None), "addition": (0.783, 0.903, 0.295, None, None)},
    "PBE": {"replacement": (0.810, 0.885, 0.304, 0.521, 0.792), "addition": (0.843, 0.908, 0.321, 0.495, 0.794)},
    "OmniGen": {"replacement": (0.802, 0.868, 0.296, 0.580, 0.792), "addition": (0.791, 0.870, 0.312, 0.605, 0.814)},
    "MIGE": {"replacement": (0.863, 0.909, 0.307, 0.652, 0.834), "addition": (0.909, 0.940, 0.322, 0.638, 0.838)},
}
