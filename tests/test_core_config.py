import pytest

from core.config import Config, load_config, save_config, section_hash
from core.errors import ConfigError


def test_defaults_are_the_papers():
    c = Config()
    assert c.deepmask.patch_size == 224 and c.deepmask.object_size == 128 and c.deepmask.mask_size == 56
    assert c.deepmask.lr == 1e-3 and c.deepmask.weight_decay == 5e-5 and c.deepmask.batch_size == 32
    assert abs(c.deepmask.score_weight - 1 / 32) < 1e-12
    assert c.detector.scales == [600] and c.detector.max_size == 1000 and c.detector.batch_rois == 128
    assert c.detector.fg_fraction == 0.25 and c.detector.bg_thresh_lo == 0.1 and c.detector.test_nms == 0.3


def test_yaml_and_set_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: exp\ndetector:\n  iters: 10\n  scales: [300, 400]\n")
    c = load_config(str(p), ["detector.iters=20", "deepmask.lr=0.01", "deepmask.train_sets=[{ann: a.json, images: im}]"])
    assert c.name == "exp" and c.detector.iters == 20 and c.detector.scales == [300, 400]
    assert c.deepmask.lr == 0.01 and c.deepmask.train_sets[0].ann == "a.json"
    save_config(c, tmp_path / "out.yaml")
    assert load_config(str(tmp_path / "out.yaml")) == c


@pytest.mark.parametrize("override,needle", [
    (["detector.iterz=3"], "detector.iterz"),
    (["detector.iters=abc"], "detector.iters"),
    (["nosuch.key=1"], "nosuch"),
    (["detector.flip=3"], "detector.flip"),
    (["detector.scales=[1, x]"], "detector.scales[1]"),
    (["novalue"], "novalue"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, override)


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("detector:\n  itres: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*detector.itres"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_section_hash_changes_with_values():
    a, b = Config(), Config()
    assert section_hash(a.detector) == section_hash(b.detector)
    b.detector.iters = 1
    assert section_hash(a.detector) != section_hash(b.detector)
    assert section_hash(a.deepmask) == section_hash(b.deepmask)
