"""Renderer: exact pixel colours, textures, characters, and visibility masks under occlusion."""
import numpy as np
import pytest

from data.render import DARK, SKIN, decode_png, encode_png, palette, render, render_array, shade, subject_mask, visible_fraction
from data.scene import COLOURS, SCENES, Placement, Scene, Subject


def subject(uid="s", category="square", colour="red", texture="plain", size="small", domain="object"):
    return Subject(uid=uid, domain=domain, category=category, colour=colour, texture=texture, size=size)


def colours_of(img: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in px) for px in img.reshape(-1, 3)}


def test_background_sky_over_ground():
    img = render_array(Scene("beach", (), 32))
    sky, ground = SCENES["beach"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    # horizon at round(0.55 * 32) = 18
    assert (img[:18] == sky).all() and (img[18:] == ground).all()


def test_plain_square_fills_its_box_exactly():
    scene = Scene("forest", (Placement(subject(), (4, 4, 13, 13)),), 32)
    img = render_array(scene)
    assert (img[4:13, 4:13] == COLOURS["red"]).all()
    assert tuple(img[3, 4]) == SCENES["forest"][0] and tuple(img[4, 13]) == SCENES["forest"][0]
    assert colours_of(img) == {COLOURS["red"], *SCENES["forest"]}


def test_circle_corner_is_background_centre_is_colour():
    scene = Scene("city", (Placement(subject(category="circle", colour="blue", size="large"), (0, 0, 13, 13)),), 32)
    img = render_array(scene)
    assert tuple(img[6, 6]) == COLOURS["blue"]
    assert tuple(img[0, 0]) == SCENES["city"][0]


def test_striped_and_dotted_textures_use_the_darker_shade():
    red, dark_red = COLOURS["red"], shade(COLOURS["red"])
    assert dark_red == (132, 24, 24)
    striped = render_array(Scene("snow", (Placement(subject(texture="striped", size="large"), (0, 0, 13, 13)),), 32))
    # band = 13 // 6 = 2 rows: rows 0-1 plain, 2-3 dark, 4-5 plain ...
    assert (striped[0:2, 0:13] == red).all() and (striped[2:4, 0:13] == dark_red).all()
    dotted = render_array(Scene("snow", (Placement(subject(texture="dotted", size="large"), (0, 0, 13, 13)),), 32))
    # step = max(3, 13 // 4) = 3, dots where y % 3 == 1 and x % 3 == 1
    assert tuple(dotted[1, 1]) == dark_red and tuple(dotted[0, 0]) == red and tuple(dotted[1, 2]) == red
    assert (dotted[0:13, 0:13] == dark_red).all(axis=-1).sum() == 16


@pytest.mark.parametrize("category", ["person", "robot"])
def test_characters_wear_the_subject_colour(category):
    s = subject(category=category, colour="green", domain="character", size="large")
    img = render_array(Scene("beach", (Placement(s, (10, 10, 23, 23)),), 32))
    got = colours_of(img)
    assert COLOURS["green"] in got and DARK in got
    assert (SKIN in got) == (category == "person")
    assert got <= set(palette().values())


def test_masks_follow_occlusion_by_later_placements():
    a = Placement(subject("a", colour="red"), (0, 0, 10, 10))
    b = Placement(subject("b", colour="blue"), (5, 5, 15, 15))
    scene = Scene("night", (a, b), 32)
    ma, mb = subject_mask(scene, 0), subject_mask(scene, 1)
    assert ma.sum() == 100 - 25 and mb.sum() == 100
    assert not (ma & mb).any()
    img = render_array(scene)
    assert tuple(img[7, 7]) == COLOURS["blue"] and tuple(img[2, 2]) == COLOURS["red"]
    # the mask is exactly where the subject's colour shows
    assert ((img == COLOURS["red"]).all(-1) == ma).all()
    assert visible_fraction(scene, 0) == pytest.approx(0.75)


def test_mask_clips_boxes_leaving_the_canvas():
    scene = Scene("beach", (Placement(subject(), (-3, 28, 6, 37)),), 32)
    assert subject_mask(scene, 0).sum() == 6 * 4


def test_png_round_trip_is_lossless_and_deterministic():
    scene = Scene("beach", (Placement(subject(texture="dotted"), (3, 3, 12, 12)),), 32)
    data = encode_png(render(scene))
    assert data == encode_png(render(scene))
    back = decode_png(data)
    assert back.mode == "RGB" and back.size == (32, 32)
    assert (np.asarray(back) == render_array(scene)).all()


def test_unknown_attributes_are_named_in_the_error():
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        render(Scene("beach", (Placement(subject(colour="mauve"), (0, 0, 9, 9)),), 32))
    with pytest.raises(ValueError, match="unknown scene background"):
        render(Scene("moon", (), 32))
