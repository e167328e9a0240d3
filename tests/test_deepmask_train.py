"""DeepMask loss (eq. (1)) and training loop: negatives' masks ignored, exact resumption, checkpoints."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.config import load_config
from core.errors import CheckpointError
from core.io import load_checkpoint
from proposals.deepmask.train import deepmask_loss, load_deepmask, train_deepmask

torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location("_dm_sampler_tests", Path(__file__).with_name("test_deepmask_sampler.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
make_coco = _mod.make_coco


def _batch(n=4, m=8, p=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = torch.randn(n, m, m, generator=g, requires_grad=True)
    sc = torch.randn(n, generator=g, requires_grad=True)
    masks = torch.rand(n, p, p, generator=g) > 0.5
    labels = torch.tensor([1.0, -1.0, 1.0, -1.0])[:n]
    return mk, sc, masks, labels


@pytest.mark.parametrize("kind", ["mask", "joint", "score"])
def test_loss_ignores_masks_of_negatives(kind):
    mk, sc, masks, labels = _batch()
    loss1, _ = deepmask_loss(mk, sc, masks, labels, kind, 1 / 32, 32)
    g1 = torch.autograd.grad(loss1, [mk, sc], allow_unused=True, materialize_grads=True)
    masks2 = masks.clone()
    masks2[labels < 0] = ~masks2[labels < 0]  # change every negative's mask
    loss2, _ = deepmask_loss(mk, sc, masks2, labels, kind, 1 / 32, 32)
    g2 = torch.autograd.grad(loss2, [mk, sc], allow_unused=True, materialize_grads=True)
    assert torch.equal(loss1, loss2)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
    assert torch.all(g1[0][labels < 0] == 0)  # no gradient through negatives' mask outputs


def test_loss_is_equation_1():
    mk, sc, masks, labels = _batch()
    loss, st = deepmask_loss(mk, sc, masks, labels, "joint", 1 / 32, 32)
    up = F.interpolate(mk[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    expected = 0.0
    for k in range(4):
        y = labels[k]
        m = masks[k].float() * 2 - 1
        expected += (1 + y) / 2 * torch.log1p(torch.exp(-m * up[k])).mean()
        expected += (1 / 32) * torch.log1p(torch.exp(-y * sc[k]))
    assert torch.allclose(loss, expected, atol=1e-5)
    # alternate mode: each batch trains one branch only
    lm, _ = deepmask_loss(mk, sc, masks, labels, "mask", 1 / 32, 32)
    ls, _ = deepmask_loss(mk, sc, masks, labels, "score", 1 / 32, 32)
    assert torch.allclose(lm + ls, loss, atol=1e-6)
    assert torch.autograd.grad(ls, mk, allow_unused=True)[0] is None
    assert torch.autograd.grad(lm, sc, allow_unused=True)[0] is None


def _cfg(src, **over):
    items = {"deepmask.trunk": "small", "deepmask.patch_size": 64, "deepmask.object_size": 32,
             "deepmask.mask_size": 8, "deepmask.seg_channels": 8, "deepmask.lowrank_dim": 8,
             "deepmask.score_hidden": "[8, 8]", "deepmask.batch_size": 4, "deepmask.pos_shift": 4,
             "deepmask.neg_shift": 8, "deepmask.workers": 0, "deepmask.val_batches": 1, "deepmask.val_every": 2,
             "deepmask.checkpoint_every": 2, "deepmask.iters": 4, "deepmask.val_fraction": 0.34,
             "deepmask.lr": 0.01}
    items.update(over)
    sets = f"deepmask.train_sets=[{{ann: '{src.ann}', images: '{src.images}'}}]"
    return load_config(None, [f"{k}={v}" for k, v in items.items()] + [sets])


def test_training_resumes_exactly(tmp_path):
    src = make_coco(tmp_path)
    cfg = _cfg(src)
    full = train_deepmask(cfg, tmp_path / "full", progress=False)
    assert full["iteration"] == 4
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.json"):
        assert (tmp_path / "full" / name).is_file()
    # stop after 2 iterations, then resume to 4 (iters may change on resume)
    train_deepmask(_cfg(src, **{"deepmask.iters": 2}), tmp_path / "split", progress=False)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["iteration"] == 2
    res = train_deepmask(cfg, tmp_path / "split", progress=False)
    assert res["iteration"] == 4
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["sampler"] == b["sampler"] == {"seed": cfg.seed, "next_batch": 4}
    for k in ("torch", "numpy", "python"):
        assert k in a["rng"]
    # a finished run returns at once; the model loads back for inference
    assert train_deepmask(cfg, tmp_path / "full", progress=False)["iteration"] == 4
    model, tcfg = load_deepmask(tmp_path / "full" / "best.pt")
    assert tcfg.deepmask.patch_size == 64 and not model.training
    assert math.isfinite(a["history"][-1]["val_metric"])


def test_resume_with_another_model_config_is_refused(tmp_path):
    src = make_coco(tmp_path)
    train_deepmask(_cfg(src, **{"deepmask.iters": 2}), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="mask_size"):
        train_deepmask(_cfg(src, **{"deepmask.mask_size": 16}), tmp_path / "run", progress=False)
