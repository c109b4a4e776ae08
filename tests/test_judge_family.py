"""One judge family: SconeEval scoring and SRUM rewards share the backends, one detection and matching module with
its thresholds named once, and one OpenAI-compatible client."""
import re
from pathlib import Path

import numpy as np

from data.openai_client import ChatClient
from data.render import render_array
from data.scene import Placement, Scene, Subject
from evaluation import detect
from evaluation.config import EvalConfig, OpenAIJudgeConfig, OracleConfig
from evaluation.detect import PRESENCE_FRACTION, SHAPE_IOU_FULL, SHAPE_IOU_ZERO, detect as find_blobs, match_one_to_one
from evaluation.judges import make_judge
from evaluation.judges.oracle import OracleThresholds
from evaluation.judges.rewards import make_reward_judge

ROOT = Path(__file__).resolve().parents[1]
RED = Subject("u1", "object", "circle", "red")


def test_the_presence_threshold_is_one_named_constant_every_reader_uses():
    assert PRESENCE_FRACTION == 0.3
    assert OracleThresholds().presence_fraction == OracleConfig().presence_fraction == PRESENCE_FRACTION
    assert (OracleThresholds().shape_iou_full, OracleThresholds().shape_iou_zero) == (SHAPE_IOU_FULL, SHAPE_IOU_ZERO)
    import evaluation.judges.rewards as rewards
    import evaluation.t2i as t2i

    assert rewards.PRESENCE_FRACTION is t2i.PRESENCE_FRACTION is detect.PRESENCE_FRACTION
    # no other module of the library defines its own presence or silhouette threshold
    pattern = re.compile(r"^\s*(PRESENCE_FRACTION|SHAPE_IOU_\w+)\s*[:=]|presence_fraction\s*[:=][^=]*\b0\.3\b", re.M)
    defining = sorted(str(p.relative_to(ROOT)) for pkg in ("data", "model", "evaluation", "registry", "tasks", "flows")
                      for p in (ROOT / pkg).rglob("*.py") if pattern.search(p.read_text()))
    assert defining == ["evaluation/detect.py"]


def test_one_to_one_matching_takes_the_best_overlap_and_drops_specks():
    gt_scene = Scene("beach", (Placement(RED, (4, 8, 16, 20)),), 32)
    (gt,) = find_blobs(render_array(gt_scene))
    near = Scene("beach", (Placement(RED, (5, 8, 17, 20)),), 32)
    far = Scene("beach", (Placement(RED, (20, 8, 32, 20)),), 32)
    found = [*find_blobs(render_array(far)), *find_blobs(render_array(near))]
    assert match_one_to_one([gt], found) == {1: 0}  # the overlapping blob, not the first one
    speck = Scene("beach", (Placement(RED, (4, 8, 8, 12)),), 32)
    small = find_blobs(render_array(speck))
    assert small and small[0].area < PRESENCE_FRACTION * gt.area and match_one_to_one([gt], small) == {}


def test_sconeeval_and_srum_rewards_share_one_openai_client(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = EvalConfig(judge="openai", openai=OpenAIJudgeConfig(base_url="http://127.0.0.1:9/v1", cache_dir=str(tmp_path)))
    judge = make_judge("openai", cfg)
    reward = make_reward_judge("openai", judge=judge)
    assert reward.client is judge and isinstance(judge.client, ChatClient)
    own = make_reward_judge("openai", openai_cfg=cfg.openai)  # built from the same settings: the same client class
    assert isinstance(own.client.client, ChatClient) and own.client.client.cache.root == judge.client.cache.root


def test_oracle_reward_and_oracle_judge_agree_on_a_perfect_render():
    target = Scene("beach", (Placement(RED, (4, 8, 16, 20)),), 32)
    row = {"key": "p0", "category": "shape", "prompt": "a red circle at the beach", "target": target,
           "layout_specified": False}
    from evaluation.judges.rewards import propose_regions

    image = render_array(target)
    g, regions = make_reward_judge("oracle").judge(row, image, propose_regions(image, row))
    assert len(regions) == 1 and regions[0].score >= 0.5 and np.isfinite(g.score)
