"""`scone model parity`: run a parity fixture's case through the release loader and the model's own methods.

A fixture directory holds `release/` (a release directory), `case.json`, `inputs.safetensors`, the reference
images, and optionally `expected.safetensors` (what the public BAGEL code computes). The outputs are written under
the expected file's keys so the two can be compared key by key.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.bagel.release import load_release

TOLERANCE = 1e-4


def load_image(path: Path) -> torch.Tensor:
    """(3, H, W) float32 normalised as BAGEL's transforms: (pixel / 255 - 0.5) / 0.5."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(pixels).permute(2, 0, 1) - 0.5) / 0.5


def compute_case(fixture: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The four outputs of the case, and the problems found on the way (a tokenizer that disagrees)."""
    fixture = Path(fixture)
    case = json.loads((fixture / "case.json").read_text())
    inputs = load_file(str(fixture / "inputs.safetensors"))
    release = load_release(fixture / "release", device=device, dtype=torch.float32)
    model = release.model
    problems = []
    for name, want in case.get("special_token_ids", {}).items():
        got = getattr(model.special, {"bos_token_id": "bos", "eos_token_id": "eos"}.get(name, name))
        if got != want:
            problems.append(f"special token {name}: tokenizer gives {got}, case says {want}")
    instruction = release.encode_text(case["instruction"])
    if "instruction_ids" in inputs and model.frame_text(instruction) != inputs["instruction_ids"].tolist():
        problems.append("instruction token ids differ from inputs.instruction_ids")
    refs = [load_image(fixture / name).to(device) for name in case["references"]]
    with torch.no_grad():
        out = {
            "velocity": model.velocity(inputs["x_t"].to(device), float(inputs["t"].reshape(-1)[0]),
                                       tuple(case["target_size"]), refs, instruction),
            "answer_logits": model.answer_logits(refs[:1], release.encode_text(case["question"])),
            "ae_encode_ref0": model.ae_encode(refs[0][None])[0],
            "ae_decode_out": model.ae_decode(inputs["ae_decode_in"][None].to(device))[0],
        }
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}, problems


def compare(outputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference per expected key (inf when missing or of another shape)."""
    diffs = {}
    for key, want in expected.items():
        got = outputs.get(key)
        if got is None or got.shape != want.shape:
            diffs[key] = float("inf")
        else:
            diffs[key] = float((got - want.float()).abs().max())
    return diffs


def run(fixture: Path, out: Path | None = None, device: str = "cpu", tolerance: float = TOLERANCE) -> int:
    fixture = Path(fixture)
    outputs, problems = compute_case(fixture, device)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file(outputs, str(out))
        print(f"wrote {', '.join(outputs)} to {out}")
    for p in problems:
        print(f"FAIL {p}")
    expected_path = fixture / "expected.safetensors"
    if not expected_path.exists():
        return 1 if problems else 0
    diffs = compare(outputs, load_file(str(expected_path)))
    for key, d in diffs.items():
        print(f"{'ok  ' if d <= tolerance else 'FAIL'} {key}: max |diff| {d:.3g}")
    worst = max(diffs.values(), default=0.0)
    print(f"parity {'passed' if worst <= tolerance and not problems else 'FAILED'} (tolerance {tolerance:g})")
    return 0 if worst <= tolerance and not problems else 1
