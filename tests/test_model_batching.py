"""Scone-S2I rows -> examples; images between uint8 arrays and the model's [-1, 1] tensors (model.batching).
Collating examples into a packed batch is the family's (test_bagel_train)."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.batching import decode_image, examples_from_rows, square_image, to_uint8


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _img(value: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def test_rows_decode_to_examples_with_one_question():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    qa = [["is there a red circle", "yes"], ["is the background a beach", "no"], ["is there a robot", "no"]]
    rows = [
        {"image": [_png(imgs[0]), _png(imgs[1]), _png(imgs[2])], "instruction": "put the red circle", "qa": json.dumps(qa)},
        {"image": [{"bytes": _png(imgs[0])}, {"bytes": _png(imgs[2])}], "instruction": "a robot"},
    ]
    ex = examples_from_rows(rows)
    assert len(ex[0].refs) == 2 and np.array_equal(ex[0].refs[1], imgs[1]) and np.array_equal(ex[0].target, imgs[2])
    assert len(ex[0].qa) == 1 and list(ex[0].qa[0]) in qa
    assert ex[0].qa == examples_from_rows(rows)[0].qa  # deterministic without a generator
    assert ex[1].qa == [] and np.array_equal(ex[1].target, imgs[2]) and len(ex[1].refs) == 1
    picks = {examples_from_rows(rows[:1], rng=np.random.default_rng(s))[0].qa[0] for s in range(20)}
    assert len(picks) > 1 and all(list(p) in qa for p in picks)
    with pytest.raises(ValueError, match="no images"):
        examples_from_rows([{"image": [], "instruction": "x"}])


def test_square_image_resizes_only_what_needs_it_and_checks_the_format():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(square_image(img, 32, "x"), img)
    big = square_image(_img(200, size=48), 32, "x")
    assert big.shape == (32, 32, 3) and big.dtype == np.uint8 and (big == 200).all()
    with pytest.raises(ValueError, match="reference 2: expected a uint8"):
        square_image(np.zeros((32, 32, 3), np.float32), 32, "reference 2")
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        square_image(np.zeros((32, 32), np.uint8), 32, "x")


def test_to_uint8_inverts_the_unit_scaling_and_clips():
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    unit = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # what the family feeds the model
    back = to_uint8(unit)
    assert back.shape == (2, 8, 8, 3) and back.dtype == np.uint8 and np.array_equal(back, imgs)
    assert to_uint8(torch.tensor([-3.0, 0.0, 3.0]).reshape(3, 1, 1)).ravel().tolist() == [0, 128, 255]


def test_decode_image_takes_bytes_or_the_hugging_face_struct():
    img = _img(7)
    assert np.array_equal(decode_image(_png(img)), img) and np.array_equal(decode_image({"bytes": _png(img)}), img)
    with pytest.raises(TypeError, match="encoded image bytes"):
        decode_image("not bytes")
