"""The BAGEL family on the stage trainer: release directory in, release directory out (model.bagel.family).

Data: a tiny synthetic Scone-S2I set (32x32 references, the target is the reference mirrored; some rows carry a
question about the target), trained at 112x112 (the tiny preset's ViT patch 14 and latent token of 16 pixels).
"""
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import model.bagel.parity as parity
from data.formats.scone_s2i import write_rows
from model.bagel import family as fam
from model.bagel.release import Release, load_release
from model.batching import Example
from model.config import ModelConfig, StageConfig, TrainConfig
from model.launch import run_stage
from model.train import apply_freezing, train_stage

FIXTURE = Path(__file__).parent / "data" / "bagel-tiny"
SPEC = fam.FAMILY_SPEC


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ref = rng.integers(0, 256, (32, 32, 3))
        qa = json.dumps([["is the cube mirrored", "yes"]]) if i % 2 == 0 else None
        rows.append({"image": [_png(ref), _png(ref[:, ::-1])], "instruction": f"mirror the red cube {i}",
                     "key": f"s2i-{i:04d}", "qa": qa})
    return rows


def _release_copy(tmp_path: Path) -> Path:
    init = tmp_path / "init"
    shutil.copytree(FIXTURE / "release", init)
    fam.mark_release(init)  # the config.json model/train.py requires of an init checkpoint
    return init


def _configs(*, steps: int, lr: float, micro_batch: int, zero_stage: int = 2, grad_accum: int = 1,
             **stage_kw):
    stage = StageConfig(datasets=["s2i"], steps=steps, lr=lr, schedule="constant", **stage_kw)
    train = TrainConfig(micro_batch=micro_batch, grad_accum=grad_accum, zero_stage=zero_stage, log_every=1,
                        save_every=100, stages={"s": stage})
    # no guidance dropout, so a repeated batch shows the loss going down
    return stage, train, ModelConfig(cfg_drop_text=0.0, cfg_drop_image=0.0)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _release_weights(directory: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(directory / "ema.safetensors"))
    state.update({"ae." + k: v for k, v in load_file(str(directory / "ae.safetensors")).items()})
    return state


# ---- no DeepSpeed: the contract pieces ----

def test_experts_partition_the_model_and_leave_vit_and_autoencoder_out():
    m = fam.load(FIXTURE / "release")
    und = {n for n, p in m.bagel.named_parameters() if fam.expert_of(n) == "understanding"}
    gen = {n for n, p in m.bagel.named_parameters() if fam.expert_of(n) == "generation"}
    assert len(m.expert_parameters("understanding")) == len(und) and len(m.expert_parameters("generation")) == len(gen)
    assert "language_model.lm_head.weight" in und and "connector.fc1.weight" in und
    assert "language_model.model.embed_tokens.weight" in und
    assert "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight" in gen
    assert "language_model.model.norm_moe_gen.weight" in gen and "time_embedder.mlp.0.weight" in gen
    assert {"vae2llm.weight", "llm2vae.bias"} <= gen
    frozen = {n for n, _ in m.bagel.named_parameters()} - und - gen
    assert frozen and all(n.startswith(("vit_model.", "ae.", "vit_pos_embed.", "latent_pos_embed.")) for n in frozen)
    assert any(n.startswith("vit_model.") for n in frozen) and any(n.startswith("ae.") for n in frozen)
    with pytest.raises(ValueError, match="no known part"):
        fam.expert_of("new_head.weight")


def test_packed_training_forward_equals_the_inference_methods():
    """The training layout is the fixture's: each packed sample's velocity and answer logits equal the
    model's own uncached `velocity` / `answer_logits` on the same x_t and t (the noise from the generator)."""
    tok = fam.tokenizer(FIXTURE / "release")
    m = fam.load(FIXTURE / "release").eval()
    batch = fam.collate(fam.examples_from_rows(_rows(3)), tok, ModelConfig())
    assert batch["pixels"].shape == (6, 3, 112, 112) and len(batch["qa"]) == 2
    with torch.no_grad():
        out = m.packed_forward(batch, torch.Generator().manual_seed(0))
        again = m.packed_forward(batch, torch.Generator().manual_seed(0))
        assert torch.equal(out["velocity"], again["velocity"])  # the noise is a function of the generator
        n = 49  # 7x7 latent tokens of a 112x112 target
        for k, s in enumerate(batch["samples"]):
            v = m.bagel.velocity(out["x_t"][k], float(out["t"][k]), (112, 112),
                                 [batch["pixels"][i] for i in s["refs"]], s["text"])
            torch.testing.assert_close(out["velocity"][k * n:(k + 1) * n], v, rtol=0, atol=2e-5)
        first = 0
        for q in batch["qa"]:
            logits = m.bagel.answer_logits([batch["pixels"][q["image"]]], q["question"])
            torch.testing.assert_close(out["logits"][first], logits, rtol=0, atol=2e-5)
            first += len(q["answer"]) + 1
        assert out["labels"].tolist() == [*batch["qa"][0]["answer"], tok.special.eos] * 2
    loss = m.training_loss(batch, bridge=False, und_loss_weight=0.1, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v.detach()) for v in loss.values()) and float(loss["und_loss"].detach()) > 0
    quarter = m.training_loss(batch, und_loss_weight=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(quarter["fm_loss"], loss["fm_loss"])  # eval mode and the same generator: the same draws
    assert quarter["loss"].item() == pytest.approx(quarter["fm_loss"].item() + 0.25 * quarter["und_loss"].item(),
                                                   rel=1e-6)
    with pytest.raises(ValueError, match="bridge"):
        m.training_loss(batch, bridge=True, und_loss_weight=0.1)


def test_every_trainable_weight_gets_a_gradient_whatever_the_batch_holds():
    """No question in the batch and every reference dropped: lm_head and the connector still run (weight 0), so
    ranks of one ZeRO step call the same modules and reduce the same gradients."""
    tok = fam.tokenizer(FIXTURE / "release")
    m = fam.load(FIXTURE / "release").train()
    rows = [dict(r, qa=None) for r in _rows(2)]
    batch = fam.collate(fam.examples_from_rows(rows), tok, ModelConfig(cfg_drop_image=1.0))
    assert batch["qa"] == []
    trainable = [p for e in ("understanding", "generation") for p in m.expert_parameters(e)]
    for p in m.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    out = m.packed_forward(batch, torch.Generator().manual_seed(0))
    assert out["drop_image"] == [True, True] and out["logits"] is None
    loss = m.training_loss(batch, generator=torch.Generator().manual_seed(0))
    assert float(loss["und_loss"]) == 0.0
    loss["loss"].backward()
    assert all(p.grad is not None for p in trainable)
    assert float(m.bagel.connector.fc1.weight.grad.abs().sum()) == 0.0  # present, and zero


def test_gradients_follow_the_freezing_and_the_generation_loss_reaches_the_understanding_expert():
    """Stage II step 1 trains the understanding expert alone: the flow-matching loss reaches it through the shared
    attention (target tokens attend to the text and ViT tokens it computes); nothing reaches the frozen parts."""
    tok = fam.tokenizer(FIXTURE / "release")
    m = fam.load(FIXTURE / "release").eval()
    batch = fam.collate(fam.examples_from_rows([dict(r, qa=None) for r in _rows(2)]), tok, ModelConfig())
    apply_freezing(m, StageConfig(datasets=["x"], steps=1, lr=1e-3, train_generation=False))
    out = m.training_loss(batch, generator=torch.Generator().manual_seed(0))
    assert float(out["und_loss"]) == 0.0  # no question: the generation loss alone
    out["loss"].backward()
    assert all(p.grad is None for p in m.expert_parameters("generation"))
    assert all(p.grad is None for p in (*m.bagel.vit_model.parameters(), *m.bagel.ae.parameters()))
    grads = {n: p.grad for n, p in m.bagel.named_parameters() if p.grad is not None}
    layer = "language_model.model.layers"
    for name in (f"{layer}.3.self_attn.k_proj.weight", f"{layer}.0.self_attn.v_proj.weight", "connector.fc2.weight",
                 "language_model.model.embed_tokens.weight"):
        assert grads[name].abs().sum() > 0, name
    assert float(grads["language_model.lm_head.weight"].abs().sum()) == 0.0  # runs with weight 0, learns nothing


def test_collate_needs_a_target_and_keeps_the_first_max_references():
    tok = fam.tokenizer(FIXTURE / "release")
    ex = fam.examples_from_rows(_rows(1))[0]
    three = Example(refs=[ex.refs[0], ex.refs[0][::-1], ex.refs[0][:, ::-1]], instruction=ex.instruction,
                    target=ex.target)
    batch = fam.collate([three], tok, ModelConfig(max_references=2))
    assert batch["samples"][0]["refs"] == [0, 1] and batch["samples"][0]["target"] == 2
    assert batch["pixels"].shape == (3, 3, 112, 112)
    torch.testing.assert_close(batch["pixels"][1], fam._pixels(three.refs[1], 112))
    with pytest.raises(ValueError, match="target"):
        fam.collate([Example(refs=ex.refs, instruction="x")], tok, ModelConfig())


def test_build_gives_fresh_tiny_weights_that_save_as_a_release(tmp_path):
    tok = fam.tokenizer(FIXTURE / "release")
    m = fam.build(ModelConfig(), tok)
    assert m.config.llm.hidden_size == 128 and not m.bagel.llm2vae.weight.any()  # tiny preset, zero velocity head
    m.save_pretrained(tmp_path / "fresh")
    reloaded = load_release(tmp_path / "fresh")  # strictly
    for k, v in m.bagel.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[k], v), k
    assert (tmp_path / "fresh" / "config.json").exists() and (tmp_path / "fresh" / "vocab.json").exists()


def test_tokenizer_needs_a_release_directory():
    with pytest.raises(ValueError, match="release directory"):
        fam.tokenizer(None)


# ---- one rank, ZeRO-2, in process ----

def test_one_rank_trains_release_to_release_with_exact_parity_round_trip(tmp_path, monkeypatch):
    write_rows(_rows(4), tmp_path / "data", "s2i", rows_per_row_group=4)
    init = _release_copy(tmp_path)
    loaded = []

    def load_and_keep(path):
        m = fam.load(path)
        loaded.append(m)
        return m

    # the trainer resolves "model.bagel.family:BAGEL" at run time: keep the model it trains, to compare with
    monkeypatch.setattr(fam, "BAGEL", dataclasses.replace(fam.BAGEL, load=load_and_keep))
    stage, train, model_cfg = _configs(steps=8, lr=2e-3, micro_batch=4)
    out = tmp_path / "out"
    summary = train_stage("s", stage, train, model_cfg, tmp_path / "data", out, init, progress=False,
                          model_family=SPEC)
    # on an accelerator the engine trained in bf16 there: the saved fp32 weights hold exactly those values
    trained = loaded[0].to("cpu", torch.float32)
    again = train_stage("s", stage, train, model_cfg, tmp_path / "data", out, init, progress=False,
                        model_family=SPEC)
    assert again == summary  # the finished stage is recognised (its config.json marker) and not trained again

    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(np.isfinite([r["loss"], r["fm_loss"], r["und_loss"]]).all() for r in rows)
    # the same four examples every step: the answer loss (no noise in it) falls, and so does the total
    assert rows[-1]["und_loss"] < 0.5 * rows[0]["und_loss"] and rows[-1]["loss"] < rows[0]["loss"]
    assert np.mean([r["fm_loss"] for r in rows[-3:]]) < np.mean([r["fm_loss"] for r in rows[:3]])
    assert summary["trainable_params"] == sum(p.numel() for e in ("understanding", "generation")
                                              for p in trained.expert_parameters(e))

    # the output is a release directory, loaded strictly; only the trained experts moved
    reloaded = load_release(out)
    assert reloaded.weights.name == "ema.safetensors" and (out / "config.json").exists()
    before, after = _release_weights(init), _release_weights(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for k in before:
        if fam.expert_of(k) is None:
            assert k not in changed, k  # ViT, autoencoder, sin-cos tables: bit identical
    for k in ("llm2vae.weight", "vae2llm.weight", "language_model.model.layers.0.mlp_moe_gen.up_proj.weight",
              "language_model.model.layers.3.mlp.up_proj.weight", "language_model.lm_head.weight",
              "connector.fc2.weight"):
        assert k in changed, k
    for k, v in trained.bagel_state_dict().items():
        assert torch.equal(v, after[k]), k  # what was saved is what was trained

    # parity round trip: a fixture whose release is the saved directory and whose expected outputs are the
    # in-memory trained model's agrees exactly (`scone model parity` at tolerance 0)
    fixture = tmp_path / "fixture"
    fixture.mkdir()
    for name in ("case.json", "inputs.safetensors", "ref0.png"):
        shutil.copy2(FIXTURE / name, fixture / name)
    shutil.copytree(out, fixture / "release", ignore=shutil.ignore_patterns("ds_state", "*.jsonl"))
    in_memory = Release(trained.bagel, reloaded.tokenizer, fixture / "release", reloaded.weights)
    with monkeypatch.context() as patch:
        patch.setattr(parity, "load_release", lambda *a, **kw: in_memory)
        expected, problems = parity.compute_case(fixture)
    assert not problems
    old = load_file(str(FIXTURE / "expected.safetensors"))
    assert expected.keys() == old.keys()
    assert not torch.equal(expected["velocity"], old["velocity"])  # training moved the velocity ...
    save_file(expected, str(fixture / "expected.safetensors"))
    assert parity.run(fixture, tolerance=0.0) == 0
    assert max(parity.compare(parity.compute_case(fixture)[0], expected).values()) == 0.0

    # the saved release initialises the next stage: generation only, the understanding expert frozen
    stage2, train2, _ = _configs(steps=2, lr=2e-3, micro_batch=4, train_understanding=False)
    train_stage("s2", stage2, train2, model_cfg, tmp_path / "data", tmp_path / "out2", out, progress=False,
                model_family=SPEC)
    second = _release_weights(tmp_path / "out2")
    for k in second:
        if fam.expert_of(k) != "generation":
            assert torch.equal(second[k], after[k]), k
    assert not torch.equal(second["llm2vae.weight"], after["llm2vae.weight"])


# ---- two torchrun ranks, ZeRO-3 ----

@pytest.mark.slow
def test_two_ranks_zero3_save_the_release_of_one_rank(tmp_path):
    write_rows(_rows(4), tmp_path / "data", "s2i", rows_per_row_group=4)
    init = _release_copy(tmp_path)
    stage, train2, model_cfg = _configs(steps=3, lr=2e-3, micro_batch=2, zero_stage=3)
    # every weight partitioned (the tiny model's are all below DeepSpeed's default persistence threshold)
    train2 = train2.model_copy(update={"zero3_persistence_threshold": 0})
    # guidance dropout on: the ranks' micro batches differ in what they hold (questions, references)
    model_cfg = model_cfg.model_copy(update={"cfg_drop_image": 0.3, "cfg_drop_text": 0.3})
    two = run_stage("s", stage, train2, model_cfg, tmp_path / "data", tmp_path / "two", init, num_ranks=2,
                    progress=False, model_family=SPEC)
    assert two["num_ranks"] == 2 and two["zero_stage"] == 3 and two["global_batch"] == 4
    a, b = two["rank_weight_checksums"]
    assert a == b  # ZeRO-3 gathered the same full weights on both ranks
    assert np.isfinite(two["final_loss"])
    load_release(tmp_path / "two")  # strictly

    # the same global batch on one rank (two micro batches of 2, ZeRO-2) ends on the same weights
    train1 = train2.model_copy(update={"grad_accum": 2, "zero_stage": 2, "zero3_persistence_threshold": None})
    one = run_stage("s", stage, train1, model_cfg, tmp_path / "data", tmp_path / "one", init, num_ranks=1,
                    progress=False, model_family=SPEC)
    w2, w1 = _release_weights(tmp_path / "two"), _release_weights(tmp_path / "one")
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=1e-5)
    before = _release_weights(init)
    assert all(torch.equal(w2[k], before[k]) for k in before if fam.expert_of(k) is None)
