"""A tiny stand-in model family and dataset writer for the stage-training tests.

FakeScone keeps the stage trainer's training contract (training_loss, expert_parameters, save_pretrained /
from_pretrained) at a few thousand parameters, so engine, data order, freezing and resume tests run in seconds.
Importable as `test_train_fakes` (pytest puts tests/ on sys.path; the torchrun test sets PYTHONPATH).
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import ModelConfig, StageConfig, TrainConfig
from model.train import ModelFamily

SIDE = 4  # fake images are 4x4 RGB
PIXELS = SIDE * SIDE * 3


class FakeScone(nn.Module):
    """encoder (frozen, like ViT) -> understanding head; generation MLP predicts the flow velocity.

    With the bridge on, the understanding head gates the condition the generation MLP sees, so the
    generation loss trains the understanding expert (as Scone Stage II step 1 does)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.hidden = hidden
        self.encoder = nn.Linear(PIXELS, hidden)
        self.und_head = nn.Linear(hidden, 1)
        self.gen_in = nn.Linear(hidden + PIXELS + 1, hidden)
        self.gen_out = nn.Linear(hidden, PIXELS)

    def expert_parameters(self, expert: str):
        if expert == "understanding":
            return list(self.und_head.parameters())
        if expert == "generation":
            return list(self.gen_in.parameters()) + list(self.gen_out.parameters())
        raise ValueError(expert)

    def training_loss(self, batch, *, bridge: bool, und_loss_weight: float, generator=None):
        cond = torch.tanh(self.encoder(batch["ref"]))
        und_logit = self.und_head(cond)
        und_loss = F.mse_loss(und_logit.squeeze(-1), batch["label"])
        if bridge:
            cond = cond * torch.sigmoid(und_logit)
        x0 = batch["target"]
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = torch.rand(x0.shape[0], 1, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = (1 - t) * x0 + t * eps
        v = self.gen_out(torch.tanh(self.gen_in(torch.cat([cond, x_t, t], dim=-1))))
        fm_loss = F.mse_loss(v, eps - x0)
        return {"loss": fm_loss + und_loss_weight * und_loss, "fm_loss": fm_loss, "und_loss": und_loss}

    def save_pretrained(self, path, state_dict=None):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({"hidden": self.hidden}))

    @classmethod
    def from_pretrained(cls, path):
        path = Path(path)
        model = cls(json.loads((path / "config.json").read_text())["hidden"])
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model


class FakeTokenizer:
    def __len__(self):
        return 8

    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text(json.dumps({"vocab": 8}))


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


DECODED = {"rows": 0}  # counts rows decoded, to check the per-process cache


def examples_from_rows(rows):
    DECODED["rows"] += len(rows)
    return [{"refs": [_decode(b) for b in r["image"][:-1]], "target": _decode(r["image"][-1]),
             "instruction": r["instruction"], "key": r.get("key")} for r in rows]


def collate(examples, tokenizer, cfg):
    def flat(a):
        return torch.tensor(a, dtype=torch.float32).reshape(-1) / 127.5 - 1.0

    target = torch.stack([flat(e["target"]) for e in examples])
    return {
        "ref": torch.stack([flat(e["refs"][0]) for e in examples]),
        "target": target,
        "label": target.mean(dim=1),
    }


FAKE = ModelFamily(
    build=lambda cfg, tok: FakeScone(),
    load=FakeScone.from_pretrained,
    tokenizer=lambda path: FakeTokenizer(),
    examples_from_rows=examples_from_rows,
    collate=collate,
)
FAMILY = "test_train_fakes:FAKE"
# A family's size is its own (a release's), not params': the wider fake is another family.
FAKE_WIDE = dataclasses.replace(FAKE, build=lambda cfg, tok: FakeScone(64))
WIDE_FAMILY = "test_train_fakes:FAKE_WIDE"


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: Path, name: str, n: int, seed: int = 0, rows_per_file: int = 8) -> list[Path]:
    """Scone-S2I layout; each row's target is its reference mirrored left-right (a learnable mapping)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ref = rng.integers(0, 256, (SIDE, SIDE, 3))
        rows.append({"image": [_png(ref), _png(ref[:, ::-1])], "instruction": f"mirror {i}",
                     "key": f"{name}-{i:04d}", "qa": json.dumps([["is it mirrored", "yes"]])})
    out = root / "parquet_data" / name
    out.mkdir(parents=True, exist_ok=True)
    paths, info = [], {}
    for j in range(0, n, rows_per_file):
        path = out / f"part-{j // rows_per_file:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[j:j + rows_per_file]), path, row_group_size=4)
        paths.append(path)
        info[str(path)] = {"num_row_groups": pq.ParquetFile(path).num_row_groups}
    (root / "parquet_info").mkdir(exist_ok=True)
    (root / "parquet_info" / f"{name}.json").write_text(json.dumps(info))
    return paths


def tiny_configs(*, steps=6, lr=3e-2, warmup=0, schedule="constant", **train_kw):
    stage = StageConfig(datasets=["fake"], steps=steps, lr=lr, warmup_steps=warmup, schedule=schedule)
    train = TrainConfig(**{"micro_batch": 4, "log_every": 1, "save_every": 100, "stages": {"s": stage}, **train_kw})
    return stage, train, ModelConfig()


# --- the fixture's own contract: the other tests rely on it ---

def test_fake_experts_are_disjoint_and_leave_the_encoder_out():
    m = FakeScone()
    und = {id(p) for p in m.expert_parameters("understanding")}
    gen = {id(p) for p in m.expert_parameters("generation")}
    assert und and gen and not und & gen
    assert {id(p) for p in m.encoder.parameters()}.isdisjoint(und | gen)


def test_fake_dataset_round_trips_through_decode_and_collate(tmp_path):
    write_dataset(tmp_path, "fake", 10)
    from data.formats.scone_s2i import iter_rows

    rows = list(iter_rows(tmp_path, "fake"))
    assert len(rows) == 10 and [r["key"] for r in rows] == [f"fake-{i:04d}" for i in range(10)]
    ex = examples_from_rows(rows)
    np.testing.assert_array_equal(ex[3]["target"], ex[3]["refs"][0][:, ::-1])
    batch = collate(ex[:2], None, None)
    assert batch["ref"].shape == (2, PIXELS) and batch["ref"].min() >= -1 and batch["ref"].max() <= 1
