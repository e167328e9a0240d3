"""SelectiveSearch: ranking, box validity, determinism, recovery of a large object; the proposer wrapper."""
import numpy as np
import pytest

from core.config import Config, SSConfig
from core.errors import ConfigError, UserError
from proposals import build_proposer, rank_scores
from proposals import selective_search as ssm
from proposals.selective_search import selective_search

H, W = 100, 120
BIG = (10, 15, 90, 80)  # x1, y1, x2, y2 of the large object (0-based edges)


def scene(seed=0):
    """A noisy grey-green background, a large textured red object and two smaller coloured rectangles."""
    rng = np.random.default_rng(seed)
    img = np.empty((H, W, 3), np.float64)
    img[:] = (90, 120, 90)
    img += rng.normal(0, 6, img.shape)
    x1, y1, x2, y2 = BIG
    yy, xx = np.mgrid[y1:y2, x1:x2]
    img[y1:y2, x1:x2] = np.stack([200 + 25 * np.sin(xx / 2.0), 40 + 10 * np.cos(yy / 3.0), 50 + 0 * xx], -1)
    img[5:35, 92:116] = (30, 40, 200)  # blue, 24x30
    img[60:92, 95:118] = (230, 220, 40)  # yellow, 23x32
    return np.clip(img, 0, 255).astype(np.uint8)


def iou(box, boxes):
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


@pytest.fixture(scope="module")
def img():
    return scene()


@pytest.fixture(scope="module")
def boxes(img):
    return selective_search(img, seed=0)


def test_boxes_valid(boxes):
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) > 5
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
    wh = boxes[:, 2:] - boxes[:, :2]
    assert (wh >= 20).all(), "boxes under 20 px must be dropped"
    assert len(np.unique(boxes, axis=0)) == len(boxes), "duplicates must be removed"
    assert np.array_equal(boxes, np.round(boxes)), "region boxes lie on pixel edges"


def test_deterministic_per_seed(img, boxes):
    again = selective_search(img, seed=0)
    assert np.array_equal(again, boxes)
    other = selective_search(img, seed=1)
    assert not np.array_equal(other, boxes), "another seed gives another ranking"
    # the same set of boxes, only ranked differently
    assert {tuple(b) for b in other.tolist()} == {tuple(b) for b in boxes.tolist()}


def test_large_object_recovered(boxes):
    best = iou(np.array(BIG, np.float32), boxes[:20])
    assert best.max() > 0.8, f"large object not among the top 20 boxes (best IoU {best.max():.2f})"


def test_min_box_parameter(img):
    b = selective_search(img, seed=0, min_box=40)
    assert ((b[:, 2:] - b[:, :2]) >= 40).all()


def test_ranking_prefers_late_merges(img):
    """Paper ranking: the whole-image region (final merge, priority 1) is near the top, initial regions low."""
    b = selective_search(img, seed=0, min_box=0)
    full = np.flatnonzero((b == np.array([0, 0, W, H], np.float32)).all(axis=1))
    assert len(full) == 1 and full[0] < 10


def test_group_merges_to_whole_image(img):
    colour = ssm._colour_image(img, "hsv")
    labels, n = ssm._segment(colour, 50, 0.8)
    assert n > 3 and labels.shape == (H, W) and labels.max() == n - 1
    pairs = ssm._neighbour_pairs(labels, n)
    assert (pairs[:, 0] < pairs[:, 1]).all()
    boxes = ssm._region_boxes(labels, n)
    sizes = np.bincount(labels.ravel(), minlength=n).astype(float)
    hist = ssm._histograms(labels, n, ssm._colour_bins(colour), 75)
    assert np.allclose(hist.sum(1), 1, atol=1e-5)
    merged = ssm._group(hist, sizes, boxes, pairs, float(H * W), True, True)
    assert len(merged) == n - 1
    assert np.array_equal(merged[-1], [0, 0, W, H])


def test_neighbours_from_label_image():
    labels = np.array([[0, 0, 1], [2, 2, 1], [3, 3, 3]], np.int32)
    pairs = ssm._neighbour_pairs(labels, 4)
    assert {tuple(p) for p in pairs.tolist()} == {(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)}


def test_tiny_and_flat_images():
    flat = np.full((30, 40, 3), 128, np.uint8)
    b = selective_search(flat, seed=0)
    assert b.shape[1] == 4 and ((b[:, 2:] - b[:, :2]) >= 20).all()
    assert selective_search(np.zeros((10, 10, 3), np.uint8)).shape == (0, 4)


def test_bad_input():
    with pytest.raises(UserError):
        selective_search(np.zeros((10, 10), np.uint8))
    with pytest.raises(UserError):
        selective_search(np.zeros((30, 30, 3), np.uint8), mode="nope")
    with pytest.raises(UserError):
        selective_search(np.zeros((30, 30, 3), np.uint8), backend="nope")


def test_opencv_backend(img):
    pytest.importorskip("cv2")
    import cv2

    if not hasattr(cv2, "ximgproc"):
        pytest.skip("opencv-contrib not installed")
    b = selective_search(img, backend="opencv", seed=0)
    assert b.dtype == np.float32 and len(b) > 0
    assert ((b[:, 2:] - b[:, :2]) >= 20).all() and len(np.unique(b, axis=0)) == len(b)
    assert (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
    assert np.array_equal(b, selective_search(img, backend="opencv", seed=0))


def test_proposer_caps_and_scores(img):
    cfg = Config(ss=SSConfig(top_n=7))
    prop = build_proposer("selective_search", cfg)
    boxes, scores, masks = prop(img)
    assert masks is None and len(boxes) == 7 == len(scores)
    assert scores.dtype == np.float32 and (np.diff(scores) < 0).all() and scores[0] == 1.0
    assert np.array_equal(boxes, selective_search(img)[:7])
    assert np.allclose(rank_scores(3, 10), [1.0, 0.9, 0.8])


def test_proposer_bad_config():
    with pytest.raises(ConfigError, match="ss.backend"):
        build_proposer("selective_search", Config(ss=SSConfig(backend="matlab")))
    with pytest.raises(ConfigError, match="ss.mode"):
        build_proposer("selective_search", Config(ss=SSConfig(mode="slow")))
    with pytest.raises(UserError, match="unknown proposal method"):
        build_proposer("edgeboxes", Config())
    with pytest.raises(UserError, match="checkpoint"):
        build_proposer("deepmask", Config())
