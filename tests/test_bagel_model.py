"""Sequence layout, attention pattern and packed-forward consistency of the BAGEL model on a second tiny
architecture (GQA ratio 4, non-square images, two references), randomly initialised."""
import pytest
import torch

from model.bagel.config import AutoencoderConfig, BagelConfig, Qwen2Config, SiglipConfig
from model.bagel.model import BagelModel
from model.bagel.packing import PackedSample, SpecialTokens

SPECIAL = SpecialTokens(bos=90, eos=91, start_of_image=92, end_of_image=93)


def test_attention_mask_on_a_hand_built_layout():
    s = PackedSample()
    s.add_text([1, 2])  # tokens 0-1, causal
    s.add_vae_image(torch.zeros(2, 4), 1, 2, 0.0, 4, SPECIAL)  # tokens 2-5: marker, 2 latents, marker
    s.add_text([3])  # token 6
    s.add_vae_image(torch.zeros(1, 4), 1, 1, 0.5, 4, SPECIAL)  # target, tokens 7-9
    T, F = True, False
    expected = torch.tensor([
        [T, F, F, F, F, F, F, F, F, F],
        [T, T, F, F, F, F, F, F, F, F],
        [T, T, T, T, T, T, F, F, F, F],
        [T, T, T, T, T, T, F, F, F, F],
        [T, T, T, T, T, T, F, F, F, F],
        [T, T, T, T, T, T, F, F, F, F],
        [T, T, T, T, T, T, T, F, F, F],
        [T, T, T, T, T, T, T, T, T, T],
        [T, T, T, T, T, T, T, T, T, T],
        [T, T, T, T, T, T, T, T, T, T],
    ])
    assert torch.equal(s.attention_mask(), expected)
    # an image takes one rotary position for all its tokens, markers included; text one per token
    assert s.position_ids == [0, 1, 2, 2, 2, 2, 3, 4, 4, 4]
    assert s.gen_mask().tolist() == [F, F, F, T, T, F, F, F, T, F]
    assert s.text_ids == [1, 2, 92, 93, 3, 92, 93]

    # the target as a continuation of a cached context sees the whole prefix and itself
    ctx = PackedSample()
    ctx.add_text([1, 2])
    target = ctx.continuation()
    target.add_vae_image(torch.zeros(1, 4), 1, 1, 0.5, 4, SPECIAL)
    assert target.position_ids == [2, 2, 2] and target.prefix_len == 2
    assert target.attention_mask().all() and target.attention_mask().shape == (3, 5)


def _second_config() -> BagelConfig:
    return BagelConfig(
        llm=Qwen2Config(vocab_size=94, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512),
        vit=SiglipConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3,
                         patch_size=14, image_size=224),
        vae=AutoencoderConfig(ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1, z_channels=4),
        max_latent_size=16, vit_max_num_patch_per_side=16,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = BagelModel(_second_config(), SPECIAL)
    m.init_fresh(zero_velocity_head=False)
    return m.eval()


@pytest.fixture(scope="module")
def refs():
    g = torch.Generator().manual_seed(1)
    # non-square: 112x224 (8x16 ViT patches, 7x14 latent tokens) and 224x112
    return [torch.rand(3, 112, 224, generator=g) * 2 - 1, torch.rand(3, 224, 112, generator=g) * 2 - 1]


@torch.no_grad()
def test_two_references_non_square_target(model, refs):
    ids = [5, 6, 7, 8]
    x_t = torch.randn(7 * 14, 16)
    v = model.velocity(x_t, 0.3, (112, 224), refs, ids)
    assert v.shape == (98, 16) and torch.isfinite(v).all()
    # the sampler's path: context encoded once, target continued from its keys/values
    context = model.encode_context(model.generation_context(refs, ids))
    assert torch.allclose(model.velocity_from_context(context, x_t, 0.3, (112, 224)), v, atol=1e-5)
    # the target depends on its own input
    assert not torch.allclose(model.velocity(x_t * 0.5, 0.3, (112, 224), refs, ids), v, atol=1e-3)


@torch.no_grad()
def test_context_never_sees_the_target(model, refs):
    def context_states(x_t):
        s = model.generation_context(refs, [5, 6])
        n = len(s)
        model.add_latent(s, x_t, 7, 14, timestep=0.5)
        return model.hidden_states([s])[0][0][:n]

    assert torch.equal(context_states(torch.randn(98, 16)), context_states(torch.randn(98, 16)))


@torch.no_grad()
def test_packed_samples_equal_separate_runs(model, refs):
    a = model.generation_context(refs[:1], [5, 6, 7])
    model.add_latent(a, torch.randn(98, 16), 7, 14, timestep=0.4)
    b = model.understanding_context(refs[1:], [9, 10])
    b.add_text([SPECIAL.bos])
    packed = model.hidden_states([a, b])[0]
    alone = [model.hidden_states([s])[0][0] for s in (a, b)]
    for p, s in zip(packed, alone):
        assert torch.allclose(p, s, atol=1e-5)


@torch.no_grad()
def test_vit_attends_within_each_image_only(model, refs):
    vit, cfg = model.vit_model, model.config
    from model.bagel.siglip import grid_position_ids, patchify

    def parts(image):
        rows, cols = image.shape[1] // 14, image.shape[2] // 14
        return patchify(image, 14), grid_position_ids(rows, cols, cfg.vit_max_num_patch_per_side)

    (pa, ia), (pb, ib) = parts(refs[0]), parts(refs[1])
    together = vit(torch.cat([pa, pb]), torch.cat([ia, ib]), [len(pa), len(pb)])
    assert torch.allclose(together[: len(pa)], vit(pa, ia, [len(pa)]), atol=1e-5)
    assert torch.allclose(together[len(pa):], vit(pb, ib, [len(pb)]), atol=1e-5)


@torch.no_grad()
def test_tokens_are_routed_to_their_expert(model, refs):
    question = model.answer_logits(refs[:1], [5, 6])
    velocity = model.velocity(torch.randn(98, 16), 0.5, (112, 224), refs[:1], [5, 6])
    gen_mlp = model.language_model.model.layers[0].mlp_moe_gen.down_proj.weight
    saved = gen_mlp.clone()
    try:
        gen_mlp.add_(0.5)
        # understanding has no latent tokens: the generation expert cannot change its answer
        assert torch.equal(model.answer_logits(refs[:1], [5, 6]), question)
        torch.manual_seed(3)
        changed = model.velocity(torch.randn(98, 16), 0.5, (112, 224), refs[:1], [5, 6])
    finally:
        gen_mlp.copy_(saved)
    torch.manual_seed(3)
    restored = model.velocity(torch.randn(98, 16), 0.5, (112, 224), refs[:1], [5, 6])
    assert not torch.allclose(changed, restored, atol=1e-4)
    assert velocity.shape == restored.shape


def test_image_sizes_must_fit_the_grids(model):
    with pytest.raises(ValueError, match="multiple of 16"):
        model.latent_grid(100, 112)
