import math

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.mige import (
    ClipEncoder,
    DinoEncoder,
    EncoderNotFoundError,
    MigeMetrics,
    clip_direction,
    cosine,
    mean_metrics,
    pixel_l1,
    pixel_l2,
)

# ---------------------------------------------------------------- tiny local encoders


def tiny_clip_dir(root):
    """A random-init CLIP (text + vision towers, 16 wide) with a tiny BPE tokenizer and an image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = ["r e", "re d</w>", "c a", "ca t</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    d = root / "clip"
    CLIPModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_dino_dir(root):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    d = root / "dino"
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=8)).save_pretrained(d)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return tiny_clip_dir(root), tiny_dino_dir(root)


@pytest.fixture(scope="module")
def metrics(encoders):
    return MigeMetrics(clip_path=encoders[0], dino_path=encoders[1])


def images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# ---------------------------------------------------------------- pixels


def test_l1_l2_hand_computed():
    a = np.zeros((2, 2, 3), dtype=np.uint8)
    b = a.copy()
    b[0] = 255  # half the pixels differ by 1.0
    assert pixel_l1(a, b) == pytest.approx(0.5)
    assert pixel_l2(a, b) == pytest.approx(0.5)
    c = np.full((2, 2, 3), 0.2)
    assert pixel_l1(np.zeros((2, 2, 3)), c) == pytest.approx(0.2)
    assert pixel_l2(np.zeros((2, 2, 3)), c) == pytest.approx(0.04)  # a mean of squares: below L1
    assert pixel_l1(b, b) == 0.0 and pixel_l2(b, b) == 0.0


def test_uint8_and_unit_float_agree():
    a, b = images(2)
    assert pixel_l1(a, b) == pytest.approx(pixel_l1(a / 255.0, b / 255.0))
    assert pixel_l2(a, b) == pytest.approx(pixel_l2(a / 255.0, b / 255.0))


def test_pixel_inputs_are_checked():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="resize=True"):
        pixel_l1(a, np.zeros((8, 8, 3), dtype=np.uint8))
    assert pixel_l1(a, np.zeros((8, 8, 3), dtype=np.uint8), resize=True) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixel_l1(np.full((4, 4, 3), 2.0), a)
    with pytest.raises(ValueError, match="H x W x 3"):
        pixel_l1(np.zeros((4, 4)), a)


# ---------------------------------------------------------------- embedding formulas


def test_cosine_and_direction_on_constructed_embeddings():
    e = np.eye(4)
    assert cosine(e[0], 3 * e[0]) == pytest.approx(1.0)
    assert cosine(e[0], e[1]) == pytest.approx(0.0)
    img_src, txt_src = e[[0]], e[[2]]
    img_gen = (e[[0]] + e[[1]]) / math.sqrt(2)  # the edit adds direction e1 to the image
    towards = (e[[2]] + e[[1]]) / math.sqrt(2)  # the captions change towards e1 too
    away = (e[[2]] - e[[1]]) / math.sqrt(2)
    # both changes have squared norm 2 - sqrt(2) and overlap 1/2 on e1
    assert clip_direction(img_gen, img_src, towards, txt_src)[0] == pytest.approx(0.5 / (2 - math.sqrt(2)))
    assert clip_direction(img_gen, img_src, away, txt_src)[0] == pytest.approx(-0.5 / (2 - math.sqrt(2)))
    orthogonal = (e[[2]] + e[[3]]) / math.sqrt(2)
    assert clip_direction(img_gen, img_src, orthogonal, txt_src)[0] == pytest.approx(0.0, abs=1e-12)
    # scale does not matter (embeddings are normalised first); no image change gives 0
    assert clip_direction(5 * img_gen, img_src, towards, 2 * txt_src)[0] == pytest.approx(0.5 / (2 - math.sqrt(2)))
    assert clip_direction(img_src, img_src, towards, txt_src)[0] == 0.0


# ---------------------------------------------------------------- encoders


def test_identical_images_score_one(metrics):
    gen = images(3, seed=1)
    rows = metrics.case_metrics(gen, [g.copy() for g in gen])
    for r in rows:
        assert r["DINO"] == pytest.approx(1.0, abs=1e-5)
        assert r["CLIP-I"] == pytest.approx(1.0, abs=1e-5)
        assert r["L1"] == 0.0 and r["L2"] == 0.0
    other = metrics.case_metrics(gen, images(3, seed=2))
    assert all(r["DINO"] < 1 - 1e-4 and r["CLIP-I"] < 1 - 1e-4 for r in other)


def test_clip_scores_match_the_model_directly(metrics, encoders):
    from transformers import AutoTokenizer, CLIPModel

    gen, src = images(2, seed=3), images(2, seed=4)
    caps, src_caps = ["a red cat", "cat"], ["a cat", "red"]
    rows = metrics.case_metrics(gen, src, captions=caps, sources=src, source_captions=src_caps)
    model = CLIPModel.from_pretrained(str(encoders[0])).eval()
    tok = AutoTokenizer.from_pretrained(str(encoders[0]))
    px = metrics.clip.image_processor(images=[Image.fromarray(g) for g in gen], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=px)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        t = tok(caps, padding=True, return_tensors="pt")
        txt = model.get_text_features(**t)
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert [r["CLIP-T"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    # CLIP-dir with the output equal to the source: no image change, no direction
    same = metrics.case_metrics(src, src, captions=caps, sources=src, source_captions=src_caps)
    assert [r["CLIP-dir"] for r in same] == [0.0, 0.0]
    assert all(-1 <= r["CLIP-dir"] <= 1 for r in rows)


def test_padding_does_not_change_a_text_embedding(metrics):
    alone = metrics.clip.text_embeddings(["cat"])
    padded = metrics.clip.text_embeddings(["cat", "a red cat on a red mat"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    tokens = metrics.clip.tokenizer.convert_ids_to_tokens(metrics.clip.tokenizer("a red cat")["input_ids"])
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "cat</w>", "<|endoftext|>"]  # the BPE merges apply
    assert not torch.allclose(alone[0], metrics.clip.text_embeddings(["red"])[0], atol=1e-3)


def test_only_pixel_metrics_without_encoders():
    rows = MigeMetrics().case_metrics(images(2), images(2, seed=9), captions=["a", "b"])
    assert set(rows[0]) == {"L1", "L2"}
    summary = mean_metrics(rows)
    assert summary["n_cases"] == 2
    assert summary["L1"] == pytest.approx(np.mean([r["L1"] for r in rows]))
    assert "DINO" not in summary


def test_mismatched_lengths(metrics):
    with pytest.raises(ValueError, match="one per case"):
        metrics.case_metrics(images(2), images(1))


def test_missing_encoder_directory_names_path_and_fix(tmp_path):
    missing = tmp_path / "no-such-clip"
    with pytest.raises(EncoderNotFoundError) as e:
        ClipEncoder(missing)
    assert str(missing) in str(e.value) and "save_pretrained" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderNotFoundError, match="config.json"):
        DinoEncoder(empty)
    with pytest.raises(EncoderNotFoundError, match="DINO"):
        MigeMetrics(dino_path=missing)


def test_a_clip_directory_is_no_dino_encoder(encoders):
    with pytest.raises(EncoderNotFoundError, match="clip"):
        DinoEncoder(encoders[0])
