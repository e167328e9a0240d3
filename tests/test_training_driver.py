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
