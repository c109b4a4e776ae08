"""SRUM rounds on BAGEL release directories (model.bagel.srum, model.srum_train, evaluation.srum).

The release is the `tiny` preset (32 x 32 images, 8 x 8 latent tokens of 16 values, latent patch 2) with fresh
weights and the fixture's Qwen2 tokenizer (358 tokens and BAGEL's markers, inside the preset's 512 embeddings).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bagel import family as fam
from model.bagel.config import preset
from model.bagel.model import BagelModel
from model.bagel.release import load_release, save_release
from model.bagel.srum import BagelSrumLoss
from model.batching import Example
from model.config import ModelConfig, SrumConfig
from model.srum_train import SrumCandidate, load_round_model, srum_stage, train_srum_round

TOKENIZER = Path(__file__).parent / "data" / "bagel-tiny" / "release"
GRID = (8, 8)
NO_DROPOUT = ModelConfig(cfg_drop_text=0.0, cfg_drop_image=0.0)


def _release(directory: Path, *, random_head: bool) -> Path:
    torch.manual_seed(0)
    model = BagelModel(preset("tiny"))
    model.init_fresh()
    if random_head:  # BAGEL starts the velocity head at zero; a random one lets gradients reach the experts
        torch.nn.init.normal_(model.llm2vae.weight, std=0.05)
    save_release(model, directory, tokenizer_from=TOKENIZER)
    fam.mark_release(directory)
    return directory


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return _release(tmp_path_factory.mktemp("bagel") / "release", random_head=True)


@pytest.fixture(scope="module")
def zero_head_release(tmp_path_factory) -> Path:
    return _release(tmp_path_factory.mktemp("bagel0") / "release", random_head=False)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _candidates(n: int, rewards=None) -> list[SrumCandidate]:
    rng = np.random.default_rng(1)
    return [SrumCandidate(Example([], f"a red circle left of a blue square {i}"), _image(10 + i),
                          rng.random(GRID).astype(np.float32) if rewards is None else rewards[i], _image(20 + i))
            for i in range(n)]


def _pair_batch(rm, cands):
    examples = [Example(c.example.refs, c.example.instruction, target=c.image) for c in cands]
    examples += [Example(c.example.refs, c.example.instruction, target=c.reference) for c in cands]
    return rm.collate(examples)


def _loss(rm, batch, reward, *, lambda_c=0.5, seed=3):
    rm.loss.lambda_c = lambda_c
    return rm.loss(batch, reward, generator=torch.Generator().manual_seed(seed))


# ---- the loss module ----

def test_round_model_of_a_release_is_the_bagel_family(release):
    rm = load_round_model(release, SrumConfig(bridge=False), NO_DROPOUT)
    assert rm.layout == "bagel-release" and rm.grid == GRID
    assert isinstance(rm.model, fam.BagelForTraining) and isinstance(rm.loss, BagelSrumLoss)
    assert rm.loss.bridge is None
    batch = _pair_batch(rm, _candidates(2))
    assert batch["pixels"].shape == (4, 3, 32, 32) and [s["target"] for s in batch["samples"]] == [0, 1, 2, 3]
    assert batch["cfg_drop_text"] == 0.0  # guidance dropout as the model config says; packed_forward draws it
    with_bridge = load_round_model(release, SrumConfig(bridge=True), NO_DROPOUT)
    assert with_bridge.loss.bridge == NO_DROPOUT.bridge
    # without a model config: the project's defaults at the side the release generates at
    default = load_round_model(release, SrumConfig(), None)
    assert default.grid == GRID and _pair_batch(default, _candidates(1))["cfg_drop_text"] == ModelConfig().cfg_drop_text


def test_reward_weighting_is_linear_and_zero_reward_leaves_only_the_constraint(release):
    rm = load_round_model(release, SrumConfig(bridge=False), NO_DROPOUT)
    rm.model.eval()  # same draws for the same generator seed
    batch = _pair_batch(rm, _candidates(2))
    with torch.no_grad():
        full, half, zero = (_loss(rm, batch, torch.full((2, *GRID), r)) for r in (1.0, 0.5, 0.0))
    assert all(torch.isfinite(full[k]) for k in ("loss", "l_r", "l_ref")) and full["l_r"].item() > 0
    assert half["l_r"].item() == pytest.approx(full["l_r"].item() / 2, rel=1e-5)
    assert zero["l_r"].item() == 0.0
    assert zero["loss"].item() == pytest.approx(0.5 * zero["l_ref"].item(), rel=1e-6)
    assert full["l_ref"].item() == pytest.approx(zero["l_ref"].item(), rel=1e-6)  # the map never touches L_ref
    with pytest.raises(ValueError, match="pairs"):
        rm.loss(batch, torch.ones(3, *GRID))


def test_one_rewarded_token_takes_the_whole_gradient(release):
    rm = load_round_model(release, SrumConfig(bridge=False), NO_DROPOUT)
    rm.model.eval()
    batch = _pair_batch(rm, _candidates(2))
    seen = []

    def keep(module, inputs, output):  # the packed velocities [4 samples * 64 tokens, 4 channels]
        output.retain_grad()
        seen.append(output)

    hook = rm.model.bagel.llm2vae.register_forward_hook(keep)
    try:
        reward = torch.zeros(2, *GRID)
        reward[1, 2, 5] = 1.0  # second candidate, latent row 2, column 5
        out = _loss(rm, batch, reward, lambda_c=0.0)
        out["loss"].backward()
    finally:
        hook.remove()
    grad = seen[0].grad.reshape(4, GRID[0] * GRID[1], -1)  # [2 generated + 2 references, tokens, channels]
    nonzero = {(int(b), int(t)) for b, t in torch.nonzero(grad.abs().sum(-1))}
    assert nonzero == {(1, 2 * GRID[1] + 5)}
    # and with lambda_c the references' tokens get gradients too
    rm.model.zero_grad()
    seen.clear()
    hook = rm.model.bagel.llm2vae.register_forward_hook(keep)
    try:
        _loss(rm, batch, reward, lambda_c=0.5)["loss"].backward()
    finally:
        hook.remove()
    grad = seen[0].grad.reshape(4, GRID[0] * GRID[1], -1).abs().sum(-1)
    assert (grad[2:] > 0).all() and (grad[0] == 0).all()


def test_the_bridge_reaches_the_packed_forward_only_for_prompts_with_references(release):
    rm = load_round_model(release, SrumConfig(bridge=True), NO_DROPOUT)
    rm.model.eval()
    seen, real = [], rm.model.packed_forward

    def spy(batch, generator=None, **kw):
        seen.append(kw)
        return real(batch, generator, **kw)

    rm.model.packed_forward = spy
    rm.loss(_pair_batch(rm, _candidates(1)), torch.ones(1, *GRID))  # text-to-image: nothing to mask
    with_refs = [c._replace(example=Example([_image(30)], c.example.instruction)) for c in _candidates(1)]
    out = rm.loss(_pair_batch(rm, with_refs), torch.ones(1, *GRID))
    assert seen == [{}, {"bridge": NO_DROPOUT.bridge}]
    assert all(torch.isfinite(out[k]) for k in ("loss", "l_r", "l_ref"))


def test_reward_map_rows_and_columns_are_the_images(zero_head_release):
    """A change of the generated image inside one 4 x 4 pixel cell must reach the loss through that cell of the
    reward map only: the map is laid out as the family packs latent tokens (row-major), not transposed.

    The autoencoder is replaced by exact average pooling over its downsampling (a fresh FLUX encoder spreads a local
    change over its neighbours through its attention block); packing, patchify (latent patch 2: one token per 4 x 4
    pixels), the packed forward and the loss are the real ones."""
    rm = load_round_model(zero_head_release, SrumConfig(bridge=False), NO_DROPOUT)
    rm.model.eval()
    cfg = rm.model.config
    z, down = cfg.vae.z_channels, cfg.latent_downsample // cfg.latent_patch_size
    assert cfg.latent_downsample == 4  # each reward cell is a 4 x 4 pixel block
    rm.model.bagel.ae_encode = lambda images: torch.nn.functional.avg_pool2d(images, down).repeat(1, 2, 1, 1)[:, :z]
    row, col = 1, 6  # off the diagonal: a transposed layout would show it at (6, 1)
    a = _image(5)
    b = a.copy()
    b[4 * row: 4 * row + 4, 4 * col: 4 * col + 4] = 255 - b[4 * row: 4 * row + 4, 4 * col: 4 * col + 4]

    def per_cell_error(generated):
        # the velocity head is zero, so each cell's error is |eps - x0|^2 of its token (same eps for the same
        # seed); L_r is linear in the map, so d L_r / d R is that error per cell
        cand = SrumCandidate(Example([], "a red circle"), generated, np.zeros(GRID, np.float32), _image(6))
        reward = torch.ones(1, *GRID, requires_grad=True)
        _loss(rm, _pair_batch(rm, [cand]), reward, seed=11)["l_r"].backward()
        return reward.grad[0]

    diff = (per_cell_error(a) - per_cell_error(b)).abs()
    assert [tuple(ix) for ix in torch.nonzero(diff).tolist()] == [(row, col)]


# ---- a round ----

def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_release(directory).model.state_dict().items()}


def test_train_srum_round_on_a_release(release, tmp_path):
    srum = SrumConfig(steps=2, micro_batch=2, warmup_steps=1, lr=1e-3, bridge=False)
    out = tmp_path / "round"
    summary = train_srum_round(release, _candidates(3), srum, ModelConfig(), out)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("loss", "l_r", "l_ref")) and r["l_r"] > 0
        assert r["loss"] == pytest.approx(r["l_r"] + 0.5 * r["l_ref"], rel=1e-5)
    assert summary["checkpoint_layout"] == "bagel-release" and summary["steps"] == 2
    assert json.loads((out / "train_summary.json").read_text())["final_loss"] == summary["final_loss"]

    before, after = _weights(release), _weights(out)  # load_release is strict: every key, every shape
    assert before.keys() == after.keys()
    model = fam.load(release)
    trainable = {id(p) for p in model.expert_parameters("generation")}
    assert summary["trainable_params"] == sum(p.numel() for p in model.expert_parameters("generation"))
    names = {n[len(fam.PREFIX):]: id(p) in trainable for n, p in model.named_parameters()}
    changed = {n for n in names if not torch.equal(before[n], after[n])}
    assert changed and all(names[n] for n in changed)  # only the generation expert moved (SRUM stage freezing)
    assert "llm2vae.weight" in changed
    assert any(n.endswith("_moe_gen.weight") for n in changed)
    assert (out / "vocab.json").is_file() and (out / "config.json").is_file()
    assert fam.load(out).weights_name == "ema.safetensors"

    # ZeRO-3 shards the weights; they are gathered for the save as the stage trainer does: the same result
    from model.config import StageConfig, TrainConfig

    zero3 = TrainConfig(zero_stage=3, precision="fp32", stages={"x": StageConfig(datasets=["x"], steps=1, lr=1e-3)})
    sharded = train_srum_round(release, _candidates(3), srum, ModelConfig(), tmp_path / "zero3", train=zero3)
    assert sharded["zero_stage"] == 3 and sharded["final_loss"] == pytest.approx(summary["final_loss"], abs=1e-6)
    # not bit for bit: ZeRO-3 keeps its fp32 partitions in flat buffers at other memory alignments, and the CPU
    # kernels' SIMD reduction order follows alignment (one float32 ulp, up to 6e-8 measured), as the stage test
    # test_zero3_on_one_rank_matches_zero2 allows too
    for k, v in _weights(tmp_path / "zero3").items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=1e-6)

    # the same directory again: the earlier checkpoint is replaced, not refused
    train_srum_round(release, _candidates(2), srum.model_copy(update={"steps": 1}), ModelConfig(), out)
    assert not torch.equal(_weights(out)["llm2vae.weight"], after["llm2vae.weight"])

    with pytest.raises(ValueError, match=r"latent grid is 8x8"):
        train_srum_round(release, _candidates(1, rewards=[np.ones((4, 4), np.float32)]), srum, None, tmp_path / "bad")


def test_crashed_round_resumes_to_the_weights_of_an_uninterrupted_round(release, tmp_path, monkeypatch):
    from model.config import StageConfig, TrainConfig

    srum = SrumConfig(steps=4, micro_batch=2, warmup_steps=1, lr=1e-3, bridge=False)
    train = TrainConfig(zero_stage=2, precision="fp32", save_every=2,
                        stages={"x": StageConfig(datasets=["x"], steps=1, lr=1e-3)})
    cands = _candidates(3)
    full = train_srum_round(release, cands, srum, ModelConfig(), tmp_path / "full", train=train)

    calls = {"n": 0}
    real_forward = BagelSrumLoss.forward

    def crashing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3: after the state saved at step 2
            raise RuntimeError("simulated crash")
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(BagelSrumLoss, "forward", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_srum_round(release, cands, srum, ModelConfig(), tmp_path / "resumed", train=train)
    assert not (tmp_path / "resumed" / "train_summary.json").exists()
    monkeypatch.setattr(BagelSrumLoss, "forward", real_forward)

    resumed = train_srum_round(release, cands, srum, ModelConfig(), tmp_path / "resumed", train=train)
    assert resumed["resumed_from_step"] == 2 and resumed["steps_this_run"] == 2 and resumed["steps"] == 4
    assert [p.name for p in (tmp_path / "resumed" / "ds_state").iterdir() if p.is_dir()] == ["step0000002"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    # metrics: each step once, and the recomputed steps match the uninterrupted round
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("full", "resumed")}
    assert [r["step"] for r in rows["resumed"]] == [1, 2, 3, 4]
    for key in ("loss", "l_r", "l_ref", "lr"):
        assert [r[key] for r in rows["resumed"]] == pytest.approx([r[key] for r in rows["full"]], abs=1e-6)
    assert resumed["mean_loss"] == pytest.approx(full["mean_loss"], abs=1e-6)

    # finished: the same round again is answered by its summary; other candidates train afresh
    monkeypatch.setattr(BagelSrumLoss, "forward", lambda *a, **kw: pytest.fail("a finished round trained again"))
    assert train_srum_round(release, cands, srum, ModelConfig(), tmp_path / "resumed", train=train) == resumed
    monkeypatch.setattr(BagelSrumLoss, "forward", real_forward)
    again = train_srum_round(release, cands[:2], srum.model_copy(update={"steps": 1}), ModelConfig(),
                             tmp_path / "resumed", train=train)
    assert again["steps"] == 1 and again["candidates"] == 2 and not (tmp_path / "resumed" / "ds_state").exists()


def test_srum_freezing_on_the_bagel_family(release):
    from model.train import apply_freezing

    model = fam.load(release)
    both = apply_freezing(model, srum_stage(SrumConfig(train_understanding=True)))
    gen = apply_freezing(model, srum_stage(SrumConfig()))
    assert {id(p) for p in gen} == {id(p) for p in model.expert_parameters("generation")}
    assert len(both) == len(gen) + len(model.expert_parameters("understanding"))
    assert not any(p.requires_grad for p in model.bagel.vit_model.parameters())
    assert not any(p.requires_grad for p in model.bagel.ae.parameters())


# ---- the round driver ----

def _prompt_rows():
    from data.scene import Placement, Scene, Subject

    red, blue = Subject("u1", "object", "circle", "red"), Subject("u2", "object", "square", "blue")
    target = Scene("beach", (Placement(red, (2, 13, 15, 26)), Placement(blue, (17, 13, 30, 26))), 32)
    return [{"key": "s0", "category": "spatial", "prompt": "a red circle on the left of a blue square at the beach",
             "target": target, "layout_specified": True}]


def test_run_round_on_a_release_with_the_oracle_judge(release, tmp_path, monkeypatch):
    from data.render import render_array
    from evaluation.config import SamplingConfig
    from evaluation.srum import candidate_seed, run_round
    from model.reward_map import reward_map, to_latent_grid

    rows = _prompt_rows()
    srum = SrumConfig(candidates=2, steps=1, micro_batch=2, warmup_steps=0, judge="oracle")
    cfg = ModelConfig(timestep_shift=2.0)
    calls = []

    def fake_generate(model, tokenizer, examples, *, steps, cfg_text, cfg_image, seed, bridge, batch_size,
                      timestep_shift, image_size):
        # the release's own model and tokenizer, with the round's settings; an untrained model draws noise,
        # so the images are the target for candidate 0 and a mirrored target for candidate 1
        assert isinstance(model, BagelModel) and isinstance(tokenizer, fam.BagelTokenizer)
        calls.append((seed, steps, bridge, timestep_shift, [e.instruction for e in examples]))
        image = render_array(rows[0]["target"])
        return [image if seed == candidate_seed(srum.seed, 1, 0) else image[:, ::-1].copy()]

    monkeypatch.setattr("model.bagel.generate.generate", fake_generate)
    summary = run_round(release, rows, srum, SamplingConfig(steps=2, cfg_text=1.0, cfg_image=1.0, batch_size=4),
                        tmp_path / "srum", 1, ckpt_dir=tmp_path / "ckpt", model_cfg=cfg)

    assert [c[0] for c in calls] == [candidate_seed(0, 1, 0), candidate_seed(0, 1, 1)]
    assert calls[0][1:] == (2, None, 2.0, [rows[0]["prompt"]])
    round_dir = tmp_path / "srum" / "round_1"
    maps = np.load(round_dir / "reward_maps.npy")
    records = [json.loads(line) for line in (round_dir / "rewards.jsonl").read_text().splitlines()]
    assert maps.shape == (2, *GRID) and len(records) == 2
    for m, r in zip(maps, records):
        np.testing.assert_allclose(m, to_latent_grid(reward_map(r["vlm_rewards"], 32, 32), GRID), atol=1e-6)
    assert records[0]["vlm_rewards"][0]["score"] == pytest.approx(1.0)  # the exact target: layout right
    assert records[1]["vlm_rewards"][0]["score"] < 0  # mirrored: the two subjects swapped sides
    assert summary["judge"] == "oracle" and summary["train"]["checkpoint_layout"] == "bagel-release"
    assert load_release(tmp_path / "ckpt").model.latent_grid(32, 32) == GRID


def test_run_round_on_a_release_with_the_real_sampler(release, tmp_path):
    from evaluation.config import SamplingConfig
    from evaluation.srum import run_round

    srum = SrumConfig(candidates=2, steps=1, micro_batch=2, warmup_steps=0, judge="oracle")
    summary = run_round(release, _prompt_rows(), srum, SamplingConfig(steps=2, cfg_text=2.0, cfg_image=1.0),
                        tmp_path / "srum", 1, ckpt_dir=tmp_path / "ckpt", model_cfg=ModelConfig())
    images = sorted((tmp_path / "srum" / "round_1" / "images").glob("*.png"))
    assert len(images) == 2 and summary["records"] == 2
    assert np.load(tmp_path / "srum" / "round_1" / "reward_maps.npy").shape == (2, *GRID)
    assert load_release(tmp_path / "ckpt").model.latent_grid(32, 32) == GRID


def test_the_self_judge_asks_the_pipeline():
    from evaluation.srum import make_reward_judge, propose_regions
    from data.render import render_array

    class Pipeline:
        asked = []

        def yes_probability(self, images, questions):
            self.asked += list(questions)
            return np.full(len(questions), 0.75)

    row = _prompt_rows()[0]
    image = render_array(row["target"])
    judge = make_reward_judge("self", pipeline=Pipeline())
    g, regions = judge.judge(row, image, propose_regions(image, row))
    assert Pipeline.asked and g.score == pytest.approx(0.5) and [r.score for r in regions] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="pipeline"):
        make_reward_judge("self")
