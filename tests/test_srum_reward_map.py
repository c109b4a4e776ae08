import json
import warnings

import numpy as np
import pytest

from model.reward_map import (
    RewardEntryWarning,
    reward_map,
    reward_maps_from_jsonl,
    reward_stats,
    to_latent_grid,
)


def glob(score):
    return {"object": "global_layout_reward", "bbox": [0, 0, 4, 4], "score": score, "reason": "layout"}


def region(bbox, score, name="red circle"):
    return {"object": name, "bbox": bbox, "score": score, "reason": "r"}


def test_overlapping_boxes_keep_the_best_judgment_per_pixel():
    rewards = [glob(1.0), region([0, 0, 2, 2], 0.6), region([1, 1, 3, 3], 0.2)]
    expected = np.array([
        [0.8, 0.8, 0.5, 0.5],
        [0.8, 0.8, 0.6, 0.5],
        [0.5, 0.6, 0.6, 0.5],
        [0.5, 0.5, 0.5, 0.5],
    ])
    np.testing.assert_allclose(reward_map(rewards, 4, 4), expected, atol=1e-6)


def test_negative_region_cannot_lower_below_neutral_and_global_scales_everything():
    # max(0.5, (-0.6 + 1) / 2) = 0.5; a region of 1.0 -> 1.0; global 0.5 -> factor 0.75
    rewards = [glob(0.5), region([0, 0, 4, 2], -0.6), region([0, 2, 1, 4], 1.0)]
    expected = 0.75 * np.array([
        [0.5, 0.5, 0.5, 0.5],
        [0.5, 0.5, 0.5, 0.5],
        [1.0, 0.5, 0.5, 0.5],
        [1.0, 0.5, 0.5, 0.5],
    ])
    out = reward_map(rewards, 4, 4)
    assert out.dtype == np.float32 and out.shape == (4, 4)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_non_square_image_and_boxes_partly_outside_are_clamped():
    # width 5, height 3; box spills left and below: x in [0, 2), y in [1, 3)
    rewards = [glob(-1.0 + 2 * 0.9), region([-3, 1, 2, 10], 0.0 + 0.8)]  # global 0.8 -> 0.9; region -> 0.9
    out = reward_map(rewards, 5, 3)
    expected = np.full((3, 5), 0.5)
    expected[1:3, 0:2] = 0.9
    np.testing.assert_allclose(out, 0.9 * expected, atol=1e-6)


@pytest.mark.parametrize("bad", [
    region([0, 0, 2], 0.9),                   # 3 numbers
    region([2, 0, 2, 3], 0.9),                # x1 <= x0
    region([0, 3, 4, 1], 0.9),                # y1 <= y0
    region([5, 5, 9, 9], 0.9),                # entirely outside: empty after clamping
    region([0, 0, "a", 2], 0.9),              # not a number
    region([0, 0, float("nan"), 2], 0.9),     # NaN coordinate
    region(None, 0.9),                        # no box
    region([0, 0, 2, 2], 1.5),                # score out of range
    region([0, 0, 2, 2], -1.01),
    region([0, 0, 2, 2], float("nan")),
    region([0, 0, 2, 2], "0.9"),              # score as text
    region([0, 0, 2, 2], True),               # a boolean is not a score
    "not a dict",
])
def test_malformed_entries_are_skipped_with_a_warning_naming_them(bad):
    good = [glob(1.0), region([2, 2, 4, 4], 1.0, name="blue square")]
    with pytest.warns(RewardEntryWarning, match=r"vlm_rewards\[1\]"):
        out = reward_map([good[0], bad, good[1]], 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = reward_map(good, 4, 4)
    np.testing.assert_array_equal(out, clean)
    assert clean[3, 3] == 1.0 and clean[0, 0] == 0.5


def test_no_regions_is_the_neutral_map_times_the_global_factor():
    np.testing.assert_allclose(reward_map([glob(0.2)], 3, 2), np.full((2, 3), 0.5 * 0.6), atol=1e-6)


def test_missing_or_malformed_global_is_neutral():
    # no global: score 0 -> factor 0.5
    with pytest.warns(RewardEntryWarning, match="neutral"):
        out = reward_map([region([0, 0, 2, 4], 1.0)], 4, 4)
    expected = np.full((4, 4), 0.5)
    expected[:, :2] = 1.0
    np.testing.assert_allclose(out, 0.5 * expected, atol=1e-6)
    with pytest.warns(RewardEntryWarning, match="global score"):
        bad_global = reward_map([glob(3.0), region([0, 0, 2, 4], 1.0)], 4, 4)
    np.testing.assert_allclose(bad_global, out)
    with pytest.warns(RewardEntryWarning):
        np.testing.assert_allclose(reward_map([], 2, 2), np.full((2, 2), 0.25))


def test_second_global_is_ignored():
    with pytest.warns(RewardEntryWarning, match="second"):
        out = reward_map([glob(1.0), glob(-1.0)], 2, 2)
    np.testing.assert_allclose(out, np.full((2, 2), 0.5))


def test_fractional_boxes_round_to_pixel_edges():
    out = reward_map([glob(1.0), region([0.4, 0.6, 2.4, 1.6], 1.0)], 4, 4)
    expected = np.full((4, 4), 0.5)
    expected[1:2, 0:2] = 1.0
    np.testing.assert_allclose(out, expected)


def test_bad_image_size_is_an_error():
    with pytest.raises(ValueError, match="width and height"):
        reward_map([glob(1.0)], 0, 4)


def test_to_latent_grid_area_average_divisible():
    m = np.arange(16, dtype=np.float32).reshape(4, 4)
    expected = np.array([[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4],
                         [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]])
    np.testing.assert_allclose(to_latent_grid(m, 2), expected, atol=1e-6)
    np.testing.assert_allclose(to_latent_grid(m, 4), m)  # identity at full resolution
    np.testing.assert_allclose(to_latent_grid(m, (1, 2)), [[np.mean(m[:, :2]), np.mean(m[:, 2:])]], atol=1e-5)


def test_to_latent_grid_area_average_non_divisible():
    # 3 -> 2 cells: cell 0 covers pixel 0 fully and half of pixel 1 (weights 2/3, 1/3)
    m = np.array([[3.0, 0.0, 6.0]] * 3)
    row = [(3.0 * 1 + 0.0 * 0.5) / 1.5, (0.0 * 0.5 + 6.0 * 1) / 1.5]
    np.testing.assert_allclose(to_latent_grid(m, 2), [row, row], atol=1e-6)


def test_to_latent_grid_keeps_the_map_mean_and_stacks():
    rng = np.random.default_rng(0)
    stack = rng.random((3, 32, 32))
    out = to_latent_grid(stack, 8)
    assert out.shape == (3, 8, 8)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), stack.mean(axis=(1, 2)), atol=1e-6)
    with pytest.raises(ValueError, match="finer"):
        to_latent_grid(stack[0], 64)


def test_reward_stats():
    maps = [np.full((2, 2), 0.5), np.array([[1.0, 0.0], [0.5, 0.5]])]
    regions = [
        [glob(-1.0), region([0, 0, 1, 1], 0.9), region([0, 0, 1, 1], -0.7)],
        [region([0, 0, 1, 1], 0.0), region([0, 0, 1, 1], "bad")],
    ]
    stats = reward_stats(maps, regions)
    values = np.array([0.5] * 4 + [1.0, 0.0, 0.5, 0.5])
    assert stats["reward_mean"] == pytest.approx(values.mean())
    assert stats["reward_std"] == pytest.approx(values.std())
    assert stats["num_regions"] == 3  # global and malformed ignored
    assert stats["regions_below_neutral"] == 1
    assert stats["frac_regions_below_neutral"] == pytest.approx(1 / 3)
    empty = reward_stats(np.full((1, 2, 2), 0.25), [])
    assert empty["num_regions"] == 0 and empty["frac_regions_below_neutral"] == 0.0
    assert empty["reward_mean"] == pytest.approx(0.25) and empty["reward_std"] == 0.0


def test_reward_maps_from_jsonl(tmp_path):
    records = [
        {"prompt": "a red circle", "vlm_rewards": [glob(1.0), region([0, 0, 2, 2], 0.6)]},
        {"prompt": "a blue square", "vlm_rewards": [glob(-0.5)]},
    ]
    path = tmp_path / "rewards.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    maps = reward_maps_from_jsonl(path, 4, 4)
    assert maps.shape == (2, 4, 4) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[0], reward_map(records[0]["vlm_rewards"], 4, 4))
    np.testing.assert_allclose(maps[1], np.full((4, 4), 0.5 * 0.25))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reward_maps_from_jsonl(tmp_path / "missing.jsonl", 4, 4)


def test_reward_maps_from_jsonl_skips_malformed_entries_with_warnings(tmp_path):
    records = [
        {"vlm_rewards": [glob(1.0), region([0, 0, 2, 2], 1.5), region([2, 2, 4, 4], 0.6)]},  # score out of range
        {"vlm_rewards": [glob(1.0)]},
    ]
    path = tmp_path / "rewards.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(RewardEntryWarning) as caught:
        maps = reward_maps_from_jsonl(path, 4, 4)
    messages = " ".join(str(w.message) for w in caught)
    assert "line 1" in messages and "vlm_rewards[1]" in messages
    expected = np.full((4, 4), 0.5)
    expected[2:, 2:] = 0.8
    np.testing.assert_allclose(maps[0], expected, atol=1e-6)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reward_maps_from_jsonl(tmp_path / "broken.jsonl", 4, 4)
