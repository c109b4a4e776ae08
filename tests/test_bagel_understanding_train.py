"""Training on understanding rows (the und_pretrain stage): understanding-only batches through the BAGEL family's
packed forward and the stage trainer, the ViT trained only where a stage says so (train_vit)."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data.formats.scone_s2i import write_rows
from model.bagel import family as fam
from model.config import ModelConfig, StageConfig, TrainConfig
from model.train import VIT, apply_freezing, train_stage

FIXTURE = Path(__file__).parent / "data" / "bagel-tiny"
QA = [["is there a red circle", "yes"], ["what colour is the circle", "red"], ["is this at night", "no"]]


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _und_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": [_png(rng.integers(0, 256, (32, 32, 3)))], "instruction": f"a red circle {i}",
             "key": f"und-{i:04d}", "qa": json.dumps(QA[: 1 + i % 3]), "task_type": "understanding"}
            for i in range(n)]


def _gen_rows(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ref = rng.integers(0, 256, (32, 32, 3))
        rows.append({"image": [_png(ref), _png(ref[:, ::-1])], "instruction": f"mirror the red cube {i}",
                     "key": f"s2i-{i:04d}", "qa": json.dumps([["is the cube mirrored", "yes"]]),
                     "task_type": "composition_single"})
    return rows


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "ema.safetensors"))


def test_understanding_rows_collate_to_questions_only():
    tok = fam.tokenizer(FIXTURE / "release")
    examples = fam.examples_from_rows(_und_rows(3) + _gen_rows(1))
    assert [e.understanding_only for e in examples] == [True, True, True, False]
    batch = fam.collate(examples, tok, ModelConfig())
    # one image per understanding row and a question sample per pair; the generation row as before
    assert batch["pixels"].shape == (5, 3, 112, 112) and len(batch["samples"]) == 1
    assert [q["image"] for q in batch["qa"]] == [0, 1, 1, 2, 2, 2, 4]
    assert [q["answer"] for q in batch["qa"][:3]] == [tok.encode(a) for _, a in (QA[0], QA[0], QA[1])]
    for e in examples[:3]:  # the token budget counts what the packed forward builds
        batch = fam.collate([e], tok, ModelConfig())
        m = fam.load(FIXTURE / "release").eval()
        with torch.no_grad():
            samples = []
            for q in batch["qa"]:
                s = m.bagel.understanding_context([batch["pixels"][q["image"]]], q["question"])
                s.add_text(m.bagel.frame_text(q["answer"]))
                samples.append(s)
        assert fam.sample_tokens(e, tok, ModelConfig()) == sum(len(s) for s in samples)
    with pytest.raises(ValueError, match="understanding row"):
        fam.examples_from_rows([dict(_und_rows(1)[0], qa=None)])


def test_an_understanding_only_batch_trains_the_understanding_path_and_calls_every_module():
    """No generation sample in the batch: the answers are the loss, fm_loss is 0, and the latent modules (encoder,
    vae2llm, time embedder, latent table, llm2vae) still run with weight 0, so every trainable weight of every
    ZeRO-3 rank gets a gradient; the ViT learns only when the stage trains it."""
    tok = fam.tokenizer(FIXTURE / "release")
    m = fam.load(FIXTURE / "release").train()
    batch = fam.collate(fam.examples_from_rows(_und_rows(2)), tok, ModelConfig())
    assert batch["samples"] == [] and len(batch["qa"]) == 3
    with torch.no_grad():
        out = m.packed_forward(batch, torch.Generator().manual_seed(0))
        assert out["velocity"] is None and out["t"] is None
        first = 0
        for q in batch["qa"]:  # the answers' logits are the inference method's
            logits = m.bagel.answer_logits([batch["pixels"][q["image"]]], q["question"])
            torch.testing.assert_close(out["logits"][first], logits, rtol=0, atol=2e-5)
            first += len(q["answer"]) + 1

    apply_freezing(m, StageConfig(datasets=["x"], steps=1, lr=1e-3, train_vit=True))  # everything trainable
    called = set()
    hooks = [mod.register_forward_hook(lambda mod, i, o, name=name: called.add(name))
             for name, mod in m.bagel.named_children()]
    loss = m.training_loss(batch, und_loss_weight=1.0, generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    assert {"vit_model", "connector", "language_model", "vae2llm", "llm2vae", "time_embedder", "latent_pos_embed",
            "vit_pos_embed"} <= called
    assert loss["fm_loss"].item() == 0.0 and loss["und_loss"].item() > 0
    assert loss["loss"].item() == pytest.approx(loss["und_loss"].item(), rel=1e-6)
    loss["loss"].backward()
    trainable = [p for e in ("understanding", "generation", VIT) for p in m.expert_parameters(e)]
    assert all(p.grad is not None for p in trainable)
    assert all(float(p.grad.abs().sum()) == 0.0 for p in m.expert_parameters("generation"))
    assert float(m.bagel.vit_model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum()) > 0
    assert float(m.bagel.connector.fc1.weight.grad.abs().sum()) > 0


def test_train_vit_is_the_only_way_the_vit_trains():
    m = fam.load(FIXTURE / "release")
    vit = {id(p) for p in m.bagel.vit_model.parameters()}
    assert {id(p) for p in m.expert_parameters(VIT)} == vit
    chosen = apply_freezing(m, StageConfig(datasets=["x"], steps=1, lr=1e-3, train_generation=False))
    assert not vit & {id(p) for p in chosen}
    chosen = apply_freezing(m, StageConfig(datasets=["x"], steps=1, lr=1e-3, train_generation=False,
                                           train_understanding=False, train_vit=True))
    assert {id(p) for p in chosen} == vit
    assert all(not p.requires_grad for p in m.bagel.ae.parameters())


def test_the_stage_trains_vit_and_understanding_on_understanding_rows_and_leaves_generation(tmp_path):
    """The und_pretrain recipe on one rank (ZeRO-2): understanding rows only, train_generation false, train_vit:
    the answer loss falls, the ViT and the understanding expert move, the generation expert stays bit identical."""
    write_rows(_und_rows(8), tmp_path / "data", "und", rows_per_row_group=4)
    init = tmp_path / "init"
    shutil.copytree(FIXTURE / "release", init)
    fam.mark_release(init)
    stage = StageConfig(datasets=["und"], steps=6, lr=3e-3, schedule="constant", train_generation=False,
                        train_vit=True, und_loss_weight=1.0)
    train = TrainConfig(micro_batch=4, log_every=1, save_every=100, stages={"und": stage})
    out = tmp_path / "out"
    summary = train_stage("und", stage, train, ModelConfig(), tmp_path / "data", out, init, progress=False,
                          model_family=fam.FAMILY_SPEC)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["fm_loss"] == 0.0 for r in rows) and rows[-1]["und_loss"] < rows[0]["und_loss"]
    before, after = _weights(init), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "vit_model.vision_model.embeddings.patch_embedding.weight" in changed
    assert {"connector.fc1.weight", "language_model.lm_head.weight"} <= changed
    assert not {k for k in changed if fam.expert_of(k) == "generation"}
    assert summary["trainable_params"] == sum(p.numel() for e in ("understanding", VIT)
                                              for p in fam.load(init).expert_parameters(e))
