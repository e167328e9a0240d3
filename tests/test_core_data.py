import numpy as np
import pytest
from PIL import Image

from core.boxes import box_iou, decode_rles, encode_masks, mask_to_box, masks_to_boxes, rle_to_boxes
from core.datasets import VOC_CLASSES, CocoDataset, VOCDataset
from core.errors import DataError, ImageError
from core.images import image_size, load_image


def _voc(tmp_path, objects, size=(40, 30), ids=("a",)):
    root = tmp_path / "VOC2007"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", size, (10, 20, 30)).save(root / "JPEGImages" / f"{i}.jpg")
        objs = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, d, b in objects)
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
    (root / "ImageSets/Main/train.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_reader_converts_one_based_inclusive(tmp_path):
    root = _voc(tmp_path, [("dog", 0, (1, 1, 10, 20)), ("person", 1, (5, 6, 40, 30))])
    ds = VOCDataset(root, "train")
    r = ds[0]
    np.testing.assert_array_equal(r.boxes, [[0, 0, 10, 20], [4, 5, 40, 30]])
    assert r.boxes.dtype == np.float32
    assert [VOC_CLASSES[k] for k in r.labels] == ["dog", "person"]
    assert r.difficult.tolist() == [False, True]
    assert (r.width, r.height) == (40, 30)


@pytest.mark.parametrize("objects,needle", [
    ([("unicorn", 0, (1, 1, 5, 5))], "unknown class 'unicorn'"),
    ([("dog", 0, (9, 1, 5, 5))], "xmin > xmax"),
])
def test_voc_bad_objects_name_the_file(tmp_path, objects, needle):
    root = _voc(tmp_path, objects)
    with pytest.raises(DataError, match=needle) as e:
        VOCDataset(root, "train")[0]
    assert "a.xml" in str(e.value)


def test_voc_broken_xml_and_missing_bndbox(tmp_path):
    root = _voc(tmp_path, [])
    (root / "Annotations/a.xml").write_text("<annotation><object><name>dog</name></object></annotation>")
    with pytest.raises(DataError, match="a.xml.*bndbox"):
        VOCDataset(root, "train")[0]
    (root / "Annotations/a.xml").write_text("<annotation><obj")
    with pytest.raises(DataError, match="a.xml: broken XML"):
        VOCDataset(root, "train")[0]
    with pytest.raises(DataError, match="split file not found"):
        VOCDataset(root, "nosplit")
    with pytest.raises(DataError, match="not found"):
        VOCDataset(tmp_path / "nowhere", "train")


def test_voc_box_outside_image_is_clipped(tmp_path):
    root = _voc(tmp_path, [("dog", 0, (1, 1, 60, 20))])
    np.testing.assert_array_equal(VOCDataset(root, "train")[0].boxes, [[0, 0, 40, 20]])


def test_real_voc_records(shared_data):
    ds = VOCDataset(shared_data / "voc2007-real/VOC2007", "val")
    assert len(ds) == 517
    for r in list(ds)[:20]:
        im = load_image(r.path)
        assert im.shape == (r.height, r.width, 3)
        assert (r.boxes[:, 2] <= r.width).all() and (r.boxes[:, 0] >= 0).all()


def test_coco_reader_masks_match_boxes(shared_data):
    root = shared_data / "coco-tiny"
    ds = CocoDataset(root / "annotations/instances_train2017.json", root / "train2017")
    n_poly = n_crowd = 0
    for r in list(ds)[:10]:
        if len(r.boxes) == 0:
            continue
        m = r.masks()
        assert m.shape == (len(r.boxes), r.height, r.width)
        b = masks_to_boxes(m)
        keep = ~r.iscrowd & (m.sum((1, 2)) > 0)
        # the COCO bbox is the polygon extent; rasterised masks agree to a few pixels (thin parts)
        assert np.abs(b[keep] - r.boxes[keep]).max() <= 3.5
        assert np.median(np.abs(b[keep] - r.boxes[keep])) <= 1.0
        n_poly += int(keep.sum())
        n_crowd += int(r.iscrowd.sum())
    assert n_poly > 0
    r = ds.get(ds.image_ids[0])
    assert r.image_id == ds.image_ids[0] and r.difficult.dtype == bool


def test_box_mask_helpers():
    m = np.zeros((3, 8, 9), bool)
    m[0, 2:4, 1:6] = True
    m[2, 7, 8] = True
    b = masks_to_boxes(m)
    np.testing.assert_array_equal(b, [[1, 2, 6, 4], [0, 0, 0, 0], [8, 7, 9, 8]])
    np.testing.assert_array_equal(mask_to_box(m[0]), b[0])
    rles = encode_masks(m)
    assert isinstance(rles[0]["counts"], str)
    assert (decode_rles(rles) == m).all()
    np.testing.assert_array_equal(rle_to_boxes(rles)[[0, 2]], b[[0, 2]])
    np.testing.assert_allclose(box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30]]), [[1 / 3, 0]])


def _save(tmp_path, name, arr, mode=None, **kw):
    p = tmp_path / name
    Image.fromarray(arr, mode=mode).save(p, **kw) if mode else Image.fromarray(arr).save(p, **kw)
    return p


def test_image_modes_become_rgb(tmp_path):
    grey = np.full((5, 7), 100, np.uint8)
    assert load_image(_save(tmp_path, "g.png", grey)).shape == (5, 7, 3)
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    out = load_image(_save(tmp_path, "a.png", rgba))
    assert out.shape == (5, 7, 3) and out[0, 0, 0] == 200
    p16 = tmp_path / "d16.png"
    Image.fromarray(np.full((5, 7), 65535, np.uint16)).save(p16)
    assert load_image(p16).max() == 255
    pal = Image.fromarray(np.zeros((5, 7, 3), np.uint8)).convert("P")
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (5, 7, 3)
    Image.new("CMYK", (7, 5), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    c = load_image(tmp_path / "c.jpg")
    assert c.shape == (5, 7, 3) and c[2, 3, 0] > 200 and c[2, 3, 1] < 60
    one = load_image(_save(tmp_path, "one.png", np.zeros((1, 1, 3), np.uint8)))
    assert one.shape == (1, 1, 3)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (20, 10, 3)
    assert image_size(tmp_path / "r.jpg") == (10, 20)


def test_bad_images_name_the_file(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = _save(tmp_path, "good.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    for name in ("zero.jpg", "text.jpg", "trunc.jpg", "missing.jpg"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)


def test_voc_max_images_keeps_first_n(tmp_path):
    root = _voc(tmp_path, [("dog", 0, (1, 1, 10, 20))], ids=("a", "b", "c"))
    assert VOCDataset(root, "train", max_images=2).image_ids == ["a", "b"]
    assert VOCDataset(root, "train").image_ids == ["a", "b", "c"]
