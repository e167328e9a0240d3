"""DeepMask training (paper §3.2, §3.4): SGD on the loss of eq. (1) over patches from proposals/deepmask/sampler.py.

Loss, eq. (1): L = sum_k [ (1 + y_k) / (2 w^o h^o) sum_ij log(1 + exp(-m_k^ij f_segm^ij(x_k)))
                          + lambda log(1 + exp(-y_k f_score(x_k))) ],  lambda = 1/32.
The mask term is a per-pixel MEAN (the 1/(w^o h^o) normaliser) taken, as §3.4 says, after the fixed bilinear
upsampling of the 56x56 output to the patch resolution (224x224) where the ground truth lives ("a final bilinear
upsampling layer is added to transform the 56x56 output prediction to the full 224x224 resolution of the
ground-truth"; downsampling the ground truth instead "slightly reduced accuracy"). So we average over the P x P
upsampled pixels: mean, not sum, keeps the paper's balance between the two terms (a sum over 224^2 pixels divided
by 56^2 would weight the mask term 16x more); it is also what the official code does (SoftMarginCriterion averages
over pixels; its mask gradients are scaled by the batch size, i.e. a sum over the batch, and the score term is
averaged, i.e. lambda = 1/batch = 1/32). The factor (1 + y_k)/2 keeps the mask term for positives only. The batch
loss is the SUM over the batch, as eq. (1) (with lr 1e-3, as the paper).

Batches (§3.2 "we alternate between backpropagating through the segmentation branch and scoring branch"):
``batch_mode: alternate`` (default) -- even iterations are mask batches (all positives, mask term only), odd ones
score batches (1:1, score term only); ``joint`` -- every batch is 1:1 and both terms are used.

Checkpoints (core.io.atomic_torch_save) every ``checkpoint_every`` iterations and at the end: ``last.pt`` (model,
optimizer, iteration, config, RNG states of torch / numpy / python, sampler state (seed, next batch)) resumes
EXACTLY -- the same numbers as an uninterrupted run; ``best.pt`` is the best by validation (mean of the mask IoU at
the binarisation threshold and the score accuracy, on fixed seeded held-out patches); the resolved config is saved
beside as ``config.yaml``; validation history in ``metrics.json``.

Under ``torchrun`` (core/distributed.py): DistributedDataParallel (gradients averaged over ranks), rank r takes every
world-th batch of the global batch stream (sampler.PatchStream), ``lr_scaling: linear`` multiplies lr by the world
size, losses are averaged over ranks for the progress bar, rank 0 alone validates and writes checkpoints (the others
wait at a barrier), and ``last.pt`` also holds every rank's RNG state and the replicas' state hashes.
"""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core import distributed
from core.distributed import rng_state as _rng_state, set_rng_state as _set_rng_state
from core.config import DM_TRAIN, Config, save_config, to_dict, values_for
from core.errors import CheckpointError, ConfigError, DataError
from core.io import atomic_torch_save, load_checkpoint, write_json

from .model import DeepMask, build_deepmask, upsample_masks
from .sampler import PatchSampler, PatchStream, SamplerParams, load_records, pad_rgb_for, split_holdout

log = logging.getLogger(__name__)

__all__ = ["deepmask_loss", "train_deepmask", "evaluate", "build_samplers"]

# ------------------------------------------------------------------------------------------------ loss
def deepmask_loss(mask_logits: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                  kind: str, score_weight: float, patch_size: int) -> tuple[torch.Tensor, dict]:
    """Eq. (1) on one batch (see the module docstring). ``kind``: 'mask' (mask term only), 'score' (score term
    only) or 'joint' (both). Returns (loss, stats) with per-sample means in stats for logging."""
    pos = labels > 0
    stats = {}
    loss = scores.new_zeros(())
    if kind in ("mask", "joint"):
        n_pos = int(pos.sum())
        if n_pos:
            # Only positives enter the mask term: (1 + y_k)/2 = 0 for negatives, so their masks are never read.
            up = upsample_masks(mask_logits[pos], patch_size)  # fixed bilinear upsampling to P x P (§3.4)
            target = masks[pos].to(up.dtype) * 2 - 1  # m_k^ij in {+-1}
            per_sample = F.softplus(-target * up).mean(dim=(1, 2))  # log(1 + exp(-m f)), mean over pixels
            loss = loss + per_sample.sum()
            stats["mask_loss"] = float(per_sample.detach().mean())
    if kind in ("score", "joint"):
        s = F.softplus(-labels * scores)
        loss = loss + score_weight * s.sum()
        stats["score_loss"] = float(s.detach().mean())
        stats["score_acc"] = float(((scores.detach() > 0) == pos).float().mean())
    return loss, stats


# ------------------------------------------------------------------------------------------------ data
def build_samplers(cfg: Config, pad_rgb) -> tuple[PatchSampler, PatchSampler]:
    """Train and validation samplers from cfg.deepmask.train_sets / val_sets (val: held-out train images when
    val_sets is empty)."""
    dm = cfg.deepmask
    if not dm.train_sets:
        raise DataError("config key 'deepmask.train_sets' is empty: list COCO instance-mask sets as "
                        "{ann: instances.json, images: folder} (or use data.synthetic=true in the experiment)")
    train = load_records(dm.train_sets, dm.categories)
    if dm.val_sets:
        val = load_records(dm.val_sets, dm.categories)
    else:
        train, val = split_holdout(train, dm.val_fraction, cfg.seed)
        log.info("deepmask: no val_sets; holding out %d of %d training images for validation", len(val),
                 len(train) + len(val))
        if not val:
            raise DataError("deepmask: no validation images (set deepmask.val_sets, or give more than one "
                            "training image)")
    params = SamplerParams.from_config(dm, pad_rgb)
    return (PatchSampler(train, params, seed=cfg.seed, name="train"),
            PatchSampler(val, params, seed=cfg.seed + 1_000_003, name="val"))


def fixed_val_batches(sampler: PatchSampler, n: int) -> list[dict]:
    """``n`` seeded 1:1 batches (fixed for a given config: the same patches at every validation)."""
    return [sampler.batch(t, kind="joint") for t in range(max(1, n))]


def _to_input(model: DeepMask, images: torch.Tensor, device) -> torch.Tensor:
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    return model.normalize(x)


@torch.no_grad()
def evaluate(model: DeepMask, batches: list[dict], device, threshold: float, score_weight: float) -> dict:
    """Mean mask IoU of the positives (sigmoid of the upsampled mask > threshold vs the ground truth), score
    accuracy (score > 0 <=> positive), and the two loss terms, on fixed batches; eval mode."""
    was_training = model.training
    model.eval()
    ious, correct, n, mask_l, score_l = [], 0, 0, [], []
    logit_thr = math.log(threshold / (1 - threshold))
    for b in batches:
        x = _to_input(model, b["images"], device)
        labels = b["labels"].to(device)
        masks = b["masks"].to(device)
        mk, sc = model(x)
        _, st = deepmask_loss(mk, sc, masks, labels, "joint", score_weight, model.patch_size)
        mask_l.append(st.get("mask_loss", 0.0))
        score_l.append(st["score_loss"])
        pos = labels > 0
        if pos.any():
            pred = upsample_masks(mk[pos], model.patch_size) > logit_thr
            gt = masks[pos]
            inter = (pred & gt).flatten(1).sum(1).float()
            union = (pred | gt).flatten(1).sum(1).float()
            ious.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).cpu())
        correct += int(((sc > 0) == pos).sum())
        n += len(labels)
    model.train(was_training)
    iou = float(torch.cat(ious).mean()) if ious else 0.0
    acc = correct / max(n, 1)
    return {"mask_iou": iou, "score_acc": acc, "mask_loss": float(np.mean(mask_l)), "score_loss":
            float(np.mean(score_l)), "val_metric": 0.5 * (iou + acc)}


# ------------------------------------------------------------------------------------------------ checkpoints


def training_identity(cfg: Config) -> dict:
    """What a checkpoint must share with the config resuming it: the fields that affect DeepMask's training
    (core/config.py metadata) except the resumable ones (iters, val_every), and the seed."""
    ident = values_for(cfg, DM_TRAIN, section="deepmask", resumable=False)
    ident["seed"] = cfg.seed
    return ident


def _check_resumable(ckpt: dict, cfg: Config, path: Path) -> None:
    from core.config import from_dict

    try:  # fields added to the config since the checkpoint was written take their defaults
        old = training_identity(from_dict(ckpt.get("config") or {}))
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not load ({e})") from None
    new = training_identity(cfg)
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            raise CheckpointError(f"{path}: was trained with {k}={old.get(k)!r}, the config says {new.get(k)!r}; "
                                  f"use another output folder (--out) to train anew")


def _lr_at(dm, it: int) -> float:
    return dm.lr * dm.gamma ** sum(1 for s in dm.lr_steps if it >= s)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ training
def train_deepmask(cfg: Config, out_dir, progress: bool = True, resume: bool = True) -> dict:
    """Train (or resume, or skip when finished) DeepMask into ``out_dir``. Returns {'best': path, 'last': path,
    'iteration': int, 'metrics': last validation}."""
    dm = cfg.deepmask
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    distributed.init()
    device = distributed.device(cfg.device)
    main = distributed.is_main()
    progress = progress and main
    lr_mult = distributed.lr_factor(dm.lr_scaling, "deepmask.lr_scaling")
    _seed_everything(cfg.seed)

    model = build_deepmask(dm).to(device)
    distributed.seed_rank_rng(cfg.seed)  # same initial weights on every rank, then per-rank dropout
    # §3.4: plain SGD, lr 1e-3, momentum 0.9, weight decay 5e-5 on every parameter.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=dm.lr, momentum=dm.momentum, weight_decay=dm.weight_decay)
    start, best, history = 0, -math.inf, []
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        _check_resumable(ckpt, cfg, last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["iteration"])
        best = float(ckpt.get("best", -math.inf))
        history = list(ckpt.get("history", []))
        _set_rng_state(distributed.rank_rng_state(ckpt.get("rng_ranks"), ckpt["rng"]))
        log.info("deepmask: resuming %s at iteration %d", last_path, start)
        if start >= dm.iters and best_path.is_file():
            log.info("deepmask: %s is complete (%d iterations); nothing to do", out_dir, start)
            return {"best": str(best_path), "last": str(last_path), "iteration": start,
                    "metrics": history[-1] if history else {}}
    if main:
        save_config(cfg, out_dir / "config.yaml")

    pad = pad_rgb_for(dm.pad_color, model.trunk.mean)
    train_sampler, val_sampler = build_samplers(cfg, pad)
    val_batches = fixed_val_batches(val_sampler, dm.val_batches) if main else []  # rank 0 validates
    log.info("deepmask: %d training positives in %d images; %d validation patches; trunk %s; %.1fM parameters",
             len(train_sampler), len(train_sampler.records), sum(len(b["labels"]) for b in val_batches), dm.trunk,
             sum(p.numel() for p in model.parameters()) / 1e6)

    def save(it: int, metrics: dict | None) -> None:
        nonlocal best
        bad = next((n for n, w in model.state_dict().items() if w.is_floating_point() and not w.isfinite().all()),
                   None)
        if bad is not None:  # never write a diverged model over the last good checkpoint
            raise DataError(f"deepmask training diverged by iteration {it} (non-finite weights in {bad}): lower "
                            f"deepmask.lr (now {dm.lr:g}); the last good checkpoint "
                            f"{last_path if last_path.is_file() else '(none yet)'} is kept")
        rng_ranks = distributed.all_gather_object(_rng_state())  # None in a single process
        replicas = distributed.replica_check(model)
        if not main:  # rank 0 writes; the others wait
            distributed.barrier()
            return
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it,
                "config": to_dict(cfg), "rng": _rng_state(), "sampler": {"seed": train_sampler.seed, "next_batch": it},
                "best": best, "history": history}
        if rng_ranks is not None:
            ckpt.update(rng_ranks=rng_ranks, distributed=replicas)
        if metrics is not None and (metrics["val_metric"] > best or not best_path.is_file()):
            best = max(best, metrics["val_metric"])
            ckpt["best"] = best
            atomic_torch_save(ckpt, best_path)
            log.info("deepmask: new best %.4f at iteration %d -> %s", best, it, best_path)
        atomic_torch_save(ckpt, last_path)
        distributed.barrier()

    # alternate batches train one branch each: DDP must allow parameters without gradient
    net = distributed.wrap_ddp(model, device, find_unused_parameters=dm.batch_mode != "joint")
    model.train()
    if start < dm.iters:
        # A dedicated generator keeps the DataLoader from drawing on the global torch RNG (exact resumption).
        loader = torch.utils.data.DataLoader(
            PatchStream(train_sampler, start, distributed.rank(), distributed.world_size()), batch_size=None,
            num_workers=dm.workers,
            generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False,
            prefetch_factor=4 if dm.workers > 0 else None,
            # spawn: forking a parent that holds OpenMP/OpenCV thread pools can deadlock
            multiprocessing_context="spawn" if dm.workers > 0 else None)
        bar = tqdm(total=dm.iters, initial=start, desc="deepmask", unit="it", disable=not progress, dynamic_ncols=True)
        run = {}
        t0, n_patches = time.time(), 0
        it = start
        metrics = None
        for batch in loader:
            if it >= dm.iters:
                break
            assert batch["index"] == it, (batch["index"], it)
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(dm, it) * lr_mult
            x = _to_input(model, batch["images"], device)
            mk, sc = net(x)
            loss, st = deepmask_loss(mk, sc, batch["masks"].to(device), batch["labels"].to(device), batch["kind"],
                                     dm.score_weight, dm.patch_size)
            if not torch.isfinite(loss):  # stop before the step: the checkpoints on disk stay good
                raise DataError(f"deepmask training diverged at iteration {it + 1} ({batch['kind']} batch, loss "
                                f"{loss.item()}): lower deepmask.lr (now {dm.lr:g}); the last good checkpoint "
                                f"{last_path if last_path.is_file() else '(none yet)'} is kept")
            optimizer.zero_grad(set_to_none=True)
            if net is not model and not loss.requires_grad:  # DDP: every rank must join the backward
                loss = loss + 0.0 * (mk.sum() + sc.sum())
            if loss.requires_grad:
                loss.backward()
                optimizer.step()
            it += 1
            n_patches += len(batch["labels"])
            st = distributed.reduce_for_logging(st, mean_keys=sorted(st))  # global batch (same keys on all ranks)
            for k, v in st.items():
                run[k] = v if k not in run else 0.95 * run[k] + 0.05 * v
            bar.update(1)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in run.items()},
                             "patch/s": f"{n_patches / max(time.time() - t0, 1e-9):.1f}"}, refresh=False)
            metrics = None
            if (dm.val_every and it % dm.val_every == 0) or it == dm.iters:
                if main:
                    metrics = evaluate(model, val_batches, device, dm.val_mask_threshold, dm.score_weight)
                    metrics["iteration"] = it
                metrics = distributed.broadcast_object(metrics)  # the others wait for rank 0's validation
                history.append(metrics)
                if main:
                    write_json(out_dir / "metrics.json", history, indent=1)
                log.info("deepmask it %d: val mask IoU %.4f, score acc %.4f (mask loss %.4f, score loss %.4f)",
                         it, metrics["mask_iou"], metrics["score_acc"], metrics["mask_loss"], metrics["score_loss"])
            if (dm.checkpoint_every and it % dm.checkpoint_every == 0) or it == dm.iters or metrics is not None:
                save(it, metrics)
        bar.close()
        del loader
    else:
        it = start
    return {"best": str(best_path), "last": str(last_path), "iteration": it,
            "metrics": history[-1] if history else {}}


def load_deepmask(checkpoint, device="cpu") -> tuple[DeepMask, Config]:
    """Model (eval mode) and the Config it was trained with, from a checkpoint written by :func:`train_deepmask`."""
    from core.config import from_dict

    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    if "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{checkpoint}: not a DeepMask checkpoint (needs 'model' and 'config')")
    train_cfg = from_dict(ckpt["config"])
    model = build_deepmask(train_cfg.deepmask, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: weights do not fit the DeepMask of its config ({str(e)[:200]})") from None
    return model.to(device).eval(), train_cfg

