"""The MoT model: checkpoint round trip, freezing groups, padding, context cache, losses, a tiny overfit."""
import numpy as np
import pytest
import torch

from model.batching import Example, collate
from model.config import BridgeConfig, ModelConfig
from model.modeling import EXPERTS, SconeConfig, SconeModel, load_checkpoint, save_checkpoint
from model.tokenizer import build_tokenizer

WORDS = ["put", "the", "red", "blue", "circle", "square", "from", "image", "on", "beach", "is", "there", "a"]
SMALL = ModelConfig(hidden_size=32, num_layers=3, num_heads=2, bridge=BridgeConfig(early_layer=0, apply_until=1, tau=0.3))


def _tokenizer():
    return build_tokenizer(WORDS)


def _model(cfg: ModelConfig = SMALL, heads: bool = True) -> SconeModel:
    torch.manual_seed(0)
    model = SconeModel.from_model_config(cfg, vocab_size=len(_tokenizer()))
    if heads:  # zero-initialised heads would make every output identical
        with torch.no_grad():
            model.velocity_head.weight.normal_(0, 0.2)
            model.lm_head.weight.normal_(0, 0.2)
    return model


def _image(rng, colour=None) -> np.ndarray:
    if colour is None:
        return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img = np.full((32, 32, 3), 128, dtype=np.uint8)
    img[8:24, 8:24] = colour
    return img


def _examples(n_refs=(1, 2), seed=0, qa=False) -> list[Example]:
    rng = np.random.default_rng(seed)
    texts = ["put the red circle on the beach", "the blue square from image 2", "circle", "a red square"]
    return [
        Example(refs=[_image(rng) for _ in range(r)], instruction=texts[i % len(texts)], target=_image(rng),
                qa=[("is there a red circle", "yes" if i % 2 else "no")] if qa else [])
        for i, r in enumerate(n_refs)
    ]


def _velocity(model, batch, bridge, seed=3):
    g = torch.Generator().manual_seed(seed)
    b = batch["ref_mask"].shape[0]
    x_t = torch.randn(b, 64, 48, generator=g)
    t = torch.rand(b, generator=g)
    return model.predict_velocity(batch, x_t, t, bridge=bridge), x_t, t


def test_config_round_trip_and_validation():
    cfg = SconeConfig.from_model_config(SMALL, vocab_size=40)
    assert cfg.to_model_config() == SMALL
    assert cfg.bridge_early_layer == 0 and cfg.bridge_tau == 0.3 and cfg.vocab_size == 40
    with pytest.raises(ValueError, match="bridge layers"):
        SconeModel(SconeConfig(num_layers=2, bridge_early_layer=1, bridge_apply_until=2))


def test_save_load_round_trip(tmp_path):
    tok, model = _tokenizer(), _model().eval()
    batch = collate(_examples((1, 3), qa=True), tok, SMALL)
    with torch.no_grad():
        before, x_t, t = _velocity(model, batch, bridge=True)
        logits = model.answer_logits(batch["qa_pixels"], batch["qa_ids"], batch["qa_mask"])
    save_checkpoint(model, tok, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    loaded, tok2 = load_checkpoint(tmp_path)
    assert tok2.get_vocab() == tok.get_vocab()
    assert loaded.config.to_model_config() == SMALL
    assert not any(p.requires_grad for p in loaded.vit.parameters())
    with torch.no_grad():
        assert torch.equal(loaded.predict_velocity(batch, x_t, t, bridge=True), before)
        assert torch.equal(loaded.answer_logits(batch["qa_pixels"], batch["qa_ids"], batch["qa_mask"]), logits)


def test_expert_groups_are_disjoint_and_cover_every_trainable_parameter():
    model = _model(heads=False)
    und = {id(p) for p in model.expert_parameters("understanding")}
    gen = {id(p) for p in model.expert_parameters("generation")}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {id(p) for p in model.vit.parameters()}
    assert und and gen and not (und & gen)
    assert und | gen == trainable
    assert not (frozen & (und | gen)) and frozen == {id(p) for p in model.parameters()} - trainable
    assert {id(model.lm_head.weight), id(model.und_embed.tokens.weight)} <= und
    assert {id(model.velocity_head.weight), id(model.gen_embed.latent_in.weight)} <= gen
    with pytest.raises(ValueError):
        model.expert_parameters("vision")
    assert set(EXPERTS) == {"understanding", "generation"}


def test_gradients_follow_the_freezing_and_never_reach_the_encoders():
    tok, model = _tokenizer(), _model().train()
    batch = collate(_examples((2, 1), qa=True), tok, SMALL)
    model.set_trainable(understanding=True, generation=False)  # Stage II step 1
    model.training_loss(batch, bridge=True, generator=torch.Generator().manual_seed(0))["loss"].backward()
    und = model.expert_parameters("understanding")
    assert all(p.grad is None for p in model.expert_parameters("generation"))
    assert all(p.grad is None for p in model.vit.parameters())
    # the flow-matching loss reaches the understanding expert through the shared attention
    assert model.layers[-1].und.qkv.weight.grad.abs().sum() > 0
    assert sum(int(p.grad is not None) for p in und) >= len(und) - 2  # only rows of unused embeddings may stay empty
    model.zero_grad(set_to_none=True)
    model.set_trainable(understanding=True, generation=True)
    batch_nq = collate(_examples((2, 1)), tok, SMALL)
    out = model.training_loss(batch_nq, bridge=False, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert out["und_loss"].item() == 0.0
    assert model.velocity_head.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad is None


@pytest.mark.parametrize("bridge", [False, True])
def test_padding_does_not_change_a_sample(bridge):
    tok, model = _tokenizer(), _model().eval()
    examples = _examples((0, 1, 2, 3, 4))
    batch = collate(examples, tok, SMALL)
    assert batch["ref_pixels"].shape == (5, 4, 3, 32, 32)
    assert batch["ref_mask"].sum(1).tolist() == [0, 1, 2, 3, 4]
    with torch.no_grad():
        v, x_t, t = _velocity(model, batch, bridge)
        assert v.shape == (5, 64, 48) and bool(torch.isfinite(v).all())
        for i, ex in enumerate(examples):
            alone = collate([ex], tok, SMALL)
            assert alone["ref_mask"].shape[1] == len(ex.refs)
            v_i = model.predict_velocity(alone, x_t[i : i + 1], t[i : i + 1], bridge=bridge)
            assert torch.allclose(v_i, v[i : i + 1], atol=2e-5), i


@pytest.mark.parametrize("bridge", [False, True])
def test_context_cache_equals_dense_packed_attention(bridge):
    tok, model = _tokenizer(), _model().eval()
    batch = collate(_examples((1, 4, 2)), tok, SMALL)
    with torch.no_grad():
        v, x_t, t = _velocity(model, batch, bridge)
        dense = model.predict_velocity_dense(batch, x_t, t, bridge=bridge)
        ctx = model.encode_context(batch, bridge=bridge)
        again = [model.velocity_from_context(ctx, x_t, t) for _ in range(2)]
    assert torch.allclose(v, dense, atol=1e-5)
    assert torch.equal(again[0], v) and torch.equal(again[1], v)  # the cache is read-only


def test_training_loss_terms_and_guidance_dropout():
    tok, model = _tokenizer(), _model()
    batch = collate(_examples((1, 2, 2, 1), qa=True), tok, SMALL)
    model.eval()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    out = model.training_loss(batch, bridge=False, und_loss_weight=0.25, generator=g())
    assert set(out) == {"loss", "fm_loss", "und_loss"}
    assert out["und_loss"].item() > 0
    assert out["loss"].item() == pytest.approx(out["fm_loss"].item() + 0.25 * out["und_loss"].item(), rel=1e-6)
    same = model(**batch, bridge=False, und_loss_weight=0.25, generator=g())
    assert torch.equal(same["loss"], out["loss"])  # eval mode: no dropout, same draws
    # guidance dropout: every sample loses both conditions with p = 1, none with p = 0
    model.config.cfg_drop_text = model.config.cfg_drop_image = 1.0
    dropped = model.drop_conditions(batch, torch.Generator().manual_seed(0))
    assert dropped["text_mask"].sum(1).tolist() == [1, 1, 1, 1] and not dropped["ref_mask"].any()
    model.config.cfg_drop_image = 0.0  # text only: references stay
    dropped = model.drop_conditions(batch, torch.Generator().manual_seed(0))
    assert dropped["text_mask"].sum(1).tolist() == [1, 1, 1, 1] and torch.equal(dropped["ref_mask"], batch["ref_mask"])
    model.config.cfg_drop_text = 0.0
    kept = model.drop_conditions(batch, torch.Generator().manual_seed(0))
    assert torch.equal(kept["text_mask"], batch["text_mask"]) and torch.equal(kept["ref_mask"], batch["ref_mask"])


def test_tiny_overfit_reduces_flow_matching_loss():
    tok = _tokenizer()
    model = _model(ModelConfig(), heads=False)  # the params.yaml tiny config
    model.config.cfg_drop_text = model.config.cfg_drop_image = 0.0
    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (235, 210, 40)]
    examples = [Example(refs=[_image(rng, c)], instruction="put the red circle on the beach", target=_image(rng, c))
                for c in colours]
    batch = collate(examples, tok, ModelConfig())

    def eval_loss():
        model.eval()
        with torch.no_grad():
            losses = [model.training_loss(batch, bridge=False, generator=torch.Generator().manual_seed(s))["fm_loss"]
                      for s in range(4)]
        model.train()
        return float(torch.stack(losses).mean())

    start = eval_loss()
    # Stage I's learning rate: the x0 head divides by t, so much larger rates oscillate on 4 examples
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = model.training_loss(batch, bridge=False, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < 0.4 * start, (start, end)
