"""The Figure 5 sweep: test mAP of each method's Fast R-CNN with its top N proposals, for every N; and the
Figure 4 recall curves (AR against the number of proposals, box and mask; recall against IoU).

    python -m pipelines.sweep --run runs/<name> [--counts 10,20,50,100,200,300,500,1000,2000]
                              [--methods deepmask,selective_search,imported:NAME]

Reads the run's `config.yaml`, its detectors `detector_<method>/final.pt` and its test-split proposal stores
`proposals/<method>_<test split>`; writes `sweep.json`, `sweep.csv`, `figure5.png`, `recall.json`, `recall.png`
and `recall_iou.png` (box recall against the IoU threshold at 10 / 100 / 1000 proposals, recall at IoU .5 / .7 and
AR against the number of proposals) into the run folder. `--methods` replaces the config's sweep.methods, e.g. to
add an imported store (`pipelines.import_proposals --out runs/<name>/proposals/imported:NAME_<split>`, its detector
trained into `runs/<name>/detector_imported:NAME`). One pass over the test images per method serves every N (the
detector's RoI head runs on the largest N once; the first N proposals' outputs are the same for any smaller N).
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

from core import distributed
from core.cli import add_set_arg, counts as counts_arg, run_main
from core.config import DET_TEST, SWEEP, Config, load_config, section_hash, values_for
from core.errors import DataError
from core.io import atomic_write_text, write_json
from pipelines.experiment import SWEEP_OUTPUTS, RunPaths, Stages

log = logging.getLogger(__name__)

LABEL = {"deepmask": "DeepMask", "selective_search": "SelectiveSearch", "random": "random boxes"}


def recall_curves(cfg: Config, run: Path, test_ds, methods, max_count: int, progress: bool = True) -> dict:
    """AR vs number of proposals on the test split: boxes against the VOC boxes (difficult ignored) for every
    method, masks against the COCO instance masks (when the dataset has them, e.g. the synthetic set) for the
    methods that make masks."""
    from core.store import ProposalStore
    from proposals.recall import LOC_IOU_THRESHOLDS, ProposalRecall, auc_grid, gt_from_coco, gt_from_records, \
        localization_curves, results_from_store

    grid = [int(c) for c in auc_grid(max_count)]
    out: dict = {"counts": grid, "box": {}, "segm": {}, "summary": {}, "localization": {}}
    box_gt = gt_from_records(test_ds, test_ds.classes, name=f"{test_ds.name}:{test_ds.split}")
    seg_json = None
    if cfg.data.synthetic and cfg.data.synthetic_root:
        p = Path(cfg.data.synthetic_root) / "annotations" / f"instances_{cfg.data.test_split}.json"
        seg_json = p if p.is_file() else None
    for method in methods:
        store = ProposalStore.open(RunPaths(run).store(method, test_ds.split))
        pr = ProposalRecall(box_gt, results_from_store(store, top=max_count), "bbox", max_count=max_count,
                            progress=progress, source=str(store.path), iou_thresholds=LOC_IOU_THRESHOLDS)
        out["box"][method] = {"counts": grid, "AR": [round(float(v), 5) for v in pr.ar_curve(grid)]}
        out["localization"][method] = localization_curves(pr, grid=grid)
        summ = {f"box AR@{c}": pr.ar(c) for c in (10, 100, 1000) if c <= max_count}
        summ["box AUC"] = pr.auc()
        if seg_json is not None and store.has_masks:
            res = results_from_store(store, top=max_count, masks=True)
            for r in res:  # COCO json ids are ints; the VOC ids of the same images are zero-padded strings
                r["image_id"] = str(int(r["image_id"]))
            sr = ProposalRecall(gt_from_coco(seg_json), res, "segm", max_count=max_count, progress=progress,
                                source=str(store.path))
            out["segm"][method] = {"counts": grid, "AR": [round(float(v), 5) for v in sr.ar_curve(grid)]}
            summ.update({f"mask AR@{c}": sr.ar(c) for c in (10, 100, 1000) if c <= max_count})
            summ["mask AUC"] = sr.auc()
        out["summary"][method] = {k: round(float(v), 4) for k, v in summ.items()}
    return out


def run_sweep(run, cfg: Config | None = None, counts: list[int] | None = None, progress: bool = True,
              methods: list[str] | None = None) -> dict:
    from core.datasets import VOCDataset
    from detector.test import test_detector
    from pipelines.plots import plot_figure5, plot_localization, plot_recall

    run = Path(run)
    if cfg is None:
        if not (run / "config.yaml").is_file():
            raise DataError(f"{run}: not a run folder (no config.yaml); run `python -m pipelines.run` first")
        cfg = load_config(str(run / "config.yaml"))
    counts = sorted(counts or cfg.sweep.counts)
    test_ds = VOCDataset(cfg.data.voc, cfg.data.test_split, max_images=cfg.data.test_images)
    methods = list(methods or cfg.sweep.methods)
    seed_rows = []
    for method in methods:
        store = RunPaths(run).store(method, test_ds.split)
        for seed, folder in RunPaths(run).detectors(cfg, method):
            ckpt = folder / "final.pt"
            for p, what in ((ckpt, f"trained detector (seed {seed})"), (store / "meta.json", "test proposals")):
                if not p.exists():
                    how = ("`python -m pipelines.import_proposals FILE ... --out STORE`, then `python -m "
                           "pipelines.train_detector --config RUN/config.yaml --proposals STORE_OF_THE_TRAIN_SPLIT "
                           f"--out {folder}`" if method.startswith("imported:") else "`python -m pipelines.run`")
                    raise DataError(f"{p}: missing {what} of method '{method}' (run {how} first)")
            log.info("sweep: %s detector (seed %d) with top %s proposals on %s", method, seed, counts, test_ds.split)
            res = test_detector(ckpt, store, test_ds, tops=counts, out_dir=RunPaths(run).results(folder), cfg=cfg,
                                progress=progress)
            for n in counts:
                seed_rows.append(_row(method, n, seed, res[n], "fixed", cfg.detector.train_top))
        for n, seed, folder in RunPaths(run).retrained(cfg, method):
            same = [r for r in seed_rows
                    if (r["method"], r["N"], r["seed"], r["protocol"]) == (method, n, seed, "fixed")]
            if n == cfg.detector.train_top and same:
                seed_rows.append({**same[0], "protocol": "retrain"})  # N = detector.train_top: the fixed detector
                continue
            ckpt = folder / "final.pt"
            if not ckpt.exists():
                raise DataError(f"{ckpt}: missing re-trained detector (top {n}, seed {seed}) of method '{method}' "
                                "(run `python -m pipelines.run` first)")
            log.info("sweep: %s detector re-trained with top %d (seed %d), tested with top %d", method, n, seed, n)
            res = test_detector(ckpt, store, test_ds, tops=[n], out_dir=RunPaths(run).results(folder), cfg=cfg,
                                progress=progress)
            seed_rows.append(_row(method, n, seed, res[n], "retrain", n))
    rows = aggregate_seeds(seed_rows)

    from core import distributed

    if not distributed.is_main():  # torchrun: every rank joined the tests above; rank 0 writes the rest
        return {"rows": rows, "seed_rows": seed_rows}
    recall = recall_curves(cfg, run, test_ds, methods, max(counts), progress)
    summary = {"name": cfg.name, "test_split": test_ds.split, "dataset": test_ds.name, "test_images": len(test_ds),
               "counts": counts,
               "seeds": sorted({r["seed"] for r in seed_rows}), "rows": rows, "seed_rows": seed_rows,
               "recall": recall["summary"]}
    write_json(run / "sweep.json", summary, indent=1)
    write_json(run / "recall.json", recall, indent=1)
    _write_csv(run / "sweep.csv", rows, seed_rows)
    plot_figure5(rows, run / "figure5.png", title=f"Fast R-CNN mAP vs proposals ({cfg.name}, {test_ds.split})")
    plot_recall({k: recall[k] for k in ("box", "segm")}, run / "recall.png",
                title=f"Average recall vs proposals ({cfg.name}, {test_ds.split})")
    plot_localization(recall["localization"], run / "recall_iou.png",
                      title=f"Box proposal localisation ({cfg.name}, {test_ds.split})")
    return summary


def _row(method: str, n: int, seed: int, res: dict, protocol: str, train_n: int) -> dict:
    return {"method": method, "N": int(n), "seed": int(seed), "protocol": protocol, "train_N": int(train_n),
            "mAP": round(float(res["mAP"]), 5), "ap": {k: round(float(v), 5) for k, v in res["ap"].items()}}


def aggregate_seeds(seed_rows: list[dict]) -> list[dict]:
    """One row per (method, protocol, N): mAP and per-class AP averaged over the detector seeds, with the spread
    (sample standard deviation, 0 for one seed), min, max and the per-seed values. ``protocol``: 'fixed' (one
    detector trained with detector.train_top proposals, tested at every N) or 'retrain' (a detector trained and
    tested with N); ``train_N``: the number of proposals its detector was trained with (0: all)."""
    import numpy as np

    groups: dict = {}
    for r in seed_rows:
        groups.setdefault((r["method"], r.get("protocol", "fixed"), r["N"]), []).append(r)
    rows = []
    for (method, protocol, n), rs in groups.items():
        m = np.array([r["mAP"] for r in rs], dtype=np.float64)
        classes = sorted({c for r in rs for c in r["ap"]})
        rows.append({"method": method, "N": n, "protocol": protocol, "train_N": rs[0].get("train_N", 0),
                     "mAP": round(float(m.mean()), 5),
                     "mAP_std": round(float(m.std(ddof=1)) if len(m) > 1 else 0.0, 5),
                     "mAP_min": round(float(m.min()), 5), "mAP_max": round(float(m.max()), 5),
                     "seeds": [r["seed"] for r in rs], "mAP_per_seed": [r["mAP"] for r in rs],
                     "ap": {c: round(float(np.mean([r["ap"][c] for r in rs if c in r["ap"]])), 5) for c in classes}})
    return rows


def _write_csv(path, rows, seed_rows) -> None:
    """One line per (method, N, seed), then the mean over seeds (seed 'mean', with mAP_std)."""
    classes = sorted({c for r in seed_rows for c in r["ap"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "protocol", "train_N", "N", "seed", "mAP", "mAP_std"] + classes)
    for r in seed_rows:
        w.writerow([r["method"], r["protocol"], r["train_N"], r["N"], r["seed"], f"{r['mAP']:.4f}", ""] +
                   [f"{r['ap'].get(c, float('nan')):.4f}" for c in classes])
    for r in rows:
        w.writerow([r["method"], r["protocol"], r["train_N"], r["N"], "mean", f"{r['mAP']:.4f}",
                    f"{r['mAP_std']:.4f}"] + [f"{r['ap'].get(c, float('nan')):.4f}" for c in classes])
    atomic_write_text(path, buf.getvalue())


def format_summary(summary: dict) -> str:
    counts = summary["counts"]
    methods = sorted({r["method"] for r in summary["rows"]})
    by = {(r["method"], r["N"]): r for r in summary["rows"] if r.get("protocol", "fixed") == "fixed"}
    retrained = sorted((r for r in summary["rows"] if r.get("protocol") == "retrain"),
                       key=lambda r: (r["method"], r["N"]))
    seeds = summary.get("seeds") or [0]
    spread = len(seeds) > 1
    w = 12 if spread else 8
    lines = [f"Fast R-CNN mAP (%) on {summary['test_split']} vs number of proposals per image"
             + (f" (mean \u00b1 std over detector seeds {seeds})" if spread else "")]
    lines.append(f"{'method':<18}" + "".join(f"{n:>{w}}" for n in counts))
    for m in methods:
        cells = []
        for n in counts:
            r = by[m, n]
            cells.append(f"{100 * r['mAP']:.1f}\u00b1{100 * r.get('mAP_std', 0):.1f}" if spread else
                         f"{100 * r['mAP']:.1f}")
        lines.append(f"{LABEL.get(m, m):<18}" + "".join(f"{c:>{w}}" for c in cells))
    if retrained:
        lines.append("re-trained at N (a detector trained and tested with the top N):")
        for r in retrained:
            val = f"{100 * r['mAP']:.1f}" + (f"\u00b1{100 * r['mAP_std']:.1f}" if spread else "")
            lines.append(f"  {LABEL.get(r['method'], r['method']):<16}N = {r['N']:<6}{val:>12}")
    lines.append("")
    lines.append("Proposal recall on the test split (COCO-style AR, IoU .5:.95)")
    keys = sorted({k for v in summary["recall"].values() for k in v})
    lines.append(f"{'method':<18}" + "".join(f"{k:>14}" for k in keys))
    for m in methods:
        vals = summary["recall"].get(m, {})
        lines.append(f"{LABEL.get(m, m):<18}" + "".join(
            f"{vals[k]:>14.3f}" if k in vals else f"{'-':>14}" for k in keys))
    return "\n".join(lines)


def _set_aside_other_sweeps(run: Path, cfg: Config | None, counts, methods, changed: bool) -> str | None:
    """Before a standalone sweep: the outputs of a sweep made under other settings (another --set, --counts or
    --methods than theirs) are moved to ``stale/sweep-<their key>/``, as pipelines.run does, never overwritten.
    Returns the key to record for this sweep, None when it recomputes the run's own sweep in place (no option given
    and pipelines.run made the outputs there, with the run's config)."""
    cfg = cfg or load_config(str(run / "config.yaml"))
    key = "standalone-" + section_hash({"sweep": values_for(cfg, SWEEP), "test": values_for(cfg, DET_TEST),
                                        "counts": sorted(counts or cfg.sweep.counts),
                                        "methods": list(methods or cfg.sweep.methods)})
    old = Stages(run).recorded_key("sweep")
    if old == key:  # the same settings as the outputs there
        return key
    if old is not None and not old.startswith("standalone-") and not changed:  # the run's own sweep, redone
        return None
    stages = Stages(run)
    # report/ shows the earlier sweep's numbers: it goes with them, and pipelines.run's report stage is marked as
    # made from another sweep, so that the run rebuilds it (its record alone would skip it as done)
    dest = stages.move_aside("sweep", old or "unrecorded", [run / n for n in (*SWEEP_OUTPUTS, "report")])
    if dest is not None:
        log.info("sweep: the earlier sweep's outputs (other settings)%s are kept in %s",
                 " and its report" if (dest / "report").exists() else "", dest)
    if stages.recorded_key("report") is not None:
        stages.mark_set_aside("report", key)
    return key


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run folder, e.g. runs/shapes")
    ap.add_argument("--counts", type=counts_arg("--counts"), default=None,
                    help="proposal counts, e.g. 10,20,50,100,200,300,500,1000,2000 (default: the config's)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: the config's sweep.methods), "
                    "e.g. deepmask,selective_search,imported:NAME")
    add_set_arg(ap, "the run's config (test settings, e.g. detector.svd=true)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.methods is not None and not methods:
        raise DataError(f"--methods {args.methods!r}: no method given")
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise DataError(f"{run}: not a run folder (no config.yaml); run `python -m pipelines.run` first")
    cfg = load_config(str(run / "config.yaml"), args.overrides) if args.overrides else None
    changed = bool(args.overrides or args.counts or methods)
    key = _set_aside_other_sweeps(run, cfg, args.counts, methods, changed) if distributed.is_main() else None
    distributed.barrier()
    summary = run_sweep(run, cfg=cfg, counts=args.counts, methods=methods)
    if key is not None and distributed.is_main():  # what pipelines.run's stage record would say: made how
        Stages(run).mark_done("sweep", key, "sweep.json")
    if not distributed.is_main():  # torchrun: rank 0 reports
        return 0
    print(format_summary(summary))
    print(f"wrote {Path(args.run) / 'figure5.png'}, sweep.json, sweep.csv, recall.png, recall_iou.png, recall.json")
    return 0


if __name__ == "__main__":
    run_main(main)
