"""The shared training driver (core/training.py) on its own: checkpoint files, identity checks, the step."""
import pytest
import torch

from core.errors import CheckpointError, DataError
from core.training import CheckpointFiles, TrainStep, check_identity, identity_mismatch


def test_numbered_checkpoints_keep_the_newest(tmp_path):
    ck = CheckpointFiles(tmp_path, "ckpt_{}.pt")
    assert ck.latest() is None and ck.describe_latest() == "(none yet)"
    for it in (2, 10, 4):
        ck.path(it).write_bytes(b"x")
    (tmp_path / "ckpt_x.pt").write_bytes(b"x")  # not a checkpoint name
    assert ck.latest() == tmp_path / "ckpt_10.pt"
    ck.remove_older(10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_10.pt", "ckpt_x.pt"]


def test_fixed_name_checkpoint_and_best(tmp_path):
    ck = CheckpointFiles(tmp_path, "last.pt", best="best.pt")
    assert ck.latest() is None and ck.best == tmp_path / "best.pt"
    ck.path(7).write_bytes(b"x")
    assert ck.path(3) == ck.latest() == tmp_path / "last.pt"
    ck.remove_older(100)
    assert ck.latest() is not None


def test_identity_mismatch_names_dotted_keys():
    old = {"detector": {"lr": 0.1, "fc_dim": 8}, "seed": 0}
    new = {"detector": {"lr": 0.1, "fc_dim": 16}, "seed": 1, "top": 5}
    assert identity_mismatch(old, new) == ["detector.fc_dim (8, now 16)", "seed (0, now 1)", "top (None, now 5)"]
    check_identity("a.pt", old, old)
    with pytest.raises(CheckpointError, match=r"a.pt: .*detector.fc_dim \(8, now 16\)"):
        check_identity("a.pt", old, new)


def _step(loss_fn):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return net, TrainStep(net, opt, loss_fn)


def test_step_updates_and_guards():
    net, step = _step(lambda n, b: (n(b).sum(), {}))
    w0 = net.weight.detach().clone()
    loss, _ = step(torch.ones(1, 2), 0)
    assert torch.isfinite(loss) and not torch.equal(net.weight, w0)
    # a loss that needs no gradient changes nothing
    net, step = _step(lambda n, b: (torch.zeros(()), {}))
    w0 = net.weight.detach().clone()
    step(None, 0)
    assert torch.equal(net.weight, w0)
    # a non-finite loss stops before the update, naming the iteration
    net, step = _step(lambda n, b: (n(b).sum() * float("nan"), {}))
    w0 = net.weight.detach().clone()
    with pytest.raises(DataError, match="iteration 5"):
        step(torch.ones(1, 2), 4)
    assert torch.equal(net.weight, w0)


def test_bfloat16_autocast_step_keeps_float32_weights_and_learns():
    # train_dtype bfloat16: the forward pass's matrix products in bfloat16, the loss, weights and gradients float32,
    # and the same problem learned as in float32
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    seen = {}

    def loss_fn(n, b):
        out = n(b[0])
        seen["dtype"] = out.dtype
        return ((out.float() - b[1]) ** 2).mean(), {}

    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(1)
        net = torch.nn.Linear(8, 1)
        step = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), loss_fn, autocast=dtype)
        first = step((x, y), 0)[0].item()
        for it in range(1, 60):
            loss, _ = step((x, y), it)
        assert seen["dtype"] == (dtype or torch.float32)
        assert loss.dtype == torch.float32 and net.weight.dtype == torch.float32
        assert net.weight.grad.dtype == torch.float32
        losses[dtype] = (first, loss.item())
    (f32_first, f32_last), (bf_first, bf_last) = losses[None], losses[torch.bfloat16]
    assert f32_last < 0.01 * f32_first and bf_last < 0.05 * bf_first
    assert abs(bf_first - f32_first) < 0.02 * f32_first  # same start: the rounding of bfloat16, no more


def test_train_dtype_keys_its_stage_only_when_set():
    from core.config import DET_TRAIN, DM_TRAIN, load_config, values_for
    from core.errors import ConfigError

    cfg = load_config("configs/shapes.yaml")
    assert "deepmask.train_dtype" not in values_for(cfg, DM_TRAIN)  # runs of earlier versions keep their keys
    assert "detector.train_dtype" not in values_for(cfg, DET_TRAIN)
    bf = load_config("configs/shapes.yaml", ["deepmask.train_dtype=bfloat16", "detector.train_dtype=bfloat16"])
    assert values_for(bf, DM_TRAIN)["deepmask.train_dtype"] == "bfloat16"
    assert values_for(bf, DET_TRAIN)["detector.train_dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="deepmask.train_dtype.*got 'bf16'"):
        load_config("configs/shapes.yaml", ["deepmask.train_dtype=bf16"])
