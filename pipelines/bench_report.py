"""The benchmark's numbers: per-item statistics, comparisons between measurements of one run (ratios, identical
proposals), and the plain-text table."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np

from .bench_plan import DEEPMASK_TRUNKS, FRCNN_TRUNKS, INT8_FRCNN_TRUNKS, LOW_PRECISION_MODES

def _pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def summarize(values: list[float], unit: str) -> dict:
    """median, p10, p90, min, max, n of per-item values in ``unit``."""
    v = [float(x) for x in values]
    if not v:
        return {"unit": unit, "n": 0}
    return {"unit": unit, "median": _pct(v, 50), "p10": _pct(v, 10), "p90": _pct(v, 90), "min": min(v),
            "max": max(v), "n": len(v)}


def throughput(seconds: list[float], items: list[int], unit: str) -> dict:
    """Per-iteration throughput items/s (median of items / time; p10 from the slow end)."""
    return summarize([n / t for n, t in zip(items, seconds) if t > 0], unit)


def compare_outputs(a_path: Path, b_path: Path) -> dict:
    """Proposals of two runs over the same images: identical boxes, scores and RLE masks?"""
    a = pickle.loads(a_path.read_bytes())
    b = pickle.loads(b_path.read_bytes())
    same, max_diff, n_same_boxes = 0, 0.0, 0
    for (ba, sa, ra), (bb, sb, rb) in zip(a, b):
        eq_boxes = ba.shape == bb.shape and bool(np.array_equal(ba, bb))
        n_same_boxes += eq_boxes
        if sa.shape == sb.shape and len(sa):
            max_diff = max(max_diff, float(np.abs(sa.astype(np.float64) - sb).max()))
        elif sa.shape != sb.shape:
            max_diff = math.inf
        if eq_boxes and np.array_equal(sa, sb) and ra == rb:
            same += 1
    return {"images": len(a), "identical_images": same, "identical_boxes_images": n_same_boxes,
            "max_abs_score_diff": max_diff, "identical": same == len(a) == len(b)}


def compare_close(a_path: Path, b_path: Path, top: int = 100) -> dict:
    """Proposals of two number formats: the fraction of a's top ``top`` boxes that b's top ``top`` contain at
    IoU >= 0.9 (mean over images), and whether they are identical anyway."""
    from core.boxes import box_iou

    a = pickle.loads(a_path.read_bytes())
    b = pickle.loads(b_path.read_bytes())
    fracs = []
    for (ba, _, _), (bb, _, _) in zip(a, b):
        if len(ba) and len(bb):
            fracs.append(float((box_iou(ba[:top], bb[:top]).max(1) >= 0.9).mean()))
    return {"images": len(a), "top": top, "matched_fraction": float(np.mean(fracs)) if fracs else None,
            "identical": compare_outputs(a_path, b_path)["identical"]}


def _paired_ratio(a: dict, b: dict) -> float | None:
    """Median over images of time_a / time_b (same images, same order)."""
    pa, pb = a.get("per_item"), b.get("per_item")
    if not pa or not pb:
        return None
    n = min(len(pa), len(pb))
    return float(np.median([x / y for x, y in zip(pa[:n], pb[:n]) if y > 0]))


def compute_ratios(results: dict) -> dict:
    """Ratios between methods measured in the same run on the same images (time per image: a / b; < 1 means a is
    faster). 'median_ratio' divides the medians; 'paired' is the median of per-image ratios."""
    pairs = []
    for t in DEEPMASK_TRUNKS:
        pairs.append((f"deepmask.{t}.batched", f"deepmask.{t}.per_scale"))
        for mode in ("batched", "per_scale"):
            pairs += [(f"deepmask.{t}.{mode}", "ss.opencv"), (f"deepmask.{t}.{mode}", "ss.skimage")]
    for m in LOW_PRECISION_MODES:
        name = f"deepmask.efficientnet_lite0.{m}"
        pairs += [(name, "deepmask.efficientnet_lite0.per_scale"), (name, "ss.opencv"), (name, "ss.skimage")]
    pairs.append(("ss.opencv", "ss.skimage"))
    for t in FRCNN_TRUNKS:
        pairs.append((f"frcnn_test.{t}.top2000", f"frcnn_test.{t}.top100"))
    for t in INT8_FRCNN_TRUNKS:
        q = f"frcnn_test.{t}.top%d.int8"
        pairs += [(q % 2000, q % 100), (q % 2000, f"frcnn_test.{t}.top2000"), (q % 100, f"frcnn_test.{t}.top100")]
    pairs += [(f"train.{s}.efficientnet_lite0.bf16", f"train.{s}.efficientnet_lite0") for s in ("deepmask", "frcnn")]
    out = {}
    for a, b in pairs:
        ra, rb = results.get(a), results.get(b)
        if not ra or not rb or "median" not in ra or "median" not in rb:
            continue
        same_images = ra.get("images") == rb.get("images")
        out[f"{a} / {b}"] = {"median_ratio": ra["median"] / rb["median"],
                             "paired": _paired_ratio(ra, rb) if same_images else None,
                             "images": min(ra["n"], rb["n"])}
    return out


def _fmt(v, unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if unit == "s/image" or unit == "s":
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def format_table(doc: dict) -> str:
    """The result document as plain-text tables (measurements, ratios, checks)."""
    s = doc["settings"]
    dm = (doc.get("config") or {}).get("deepmask") or {}
    lines = [f"images: {s['images']} (VGG trunks: first {s['heavy_images']}); device {s['device']}; "
             f"repeats {s['repeats']}, warm-up {s['warmup']}; isolation {s['isolation']}",
             f"load average at start {doc.get('load_avg_start')}, at end {doc.get('load_avg_end')}; "
             f"cpu: {doc['host'].get('cpu', '?')} x{doc['host'].get('cpus')}",
             f"deepmask: top_n {dm.get('top_n')}, seg_channels {dm.get('seg_channels')}, objects {dm.get('object_range')} px"
             f" step 2^{dm.get('scale_step')}, max_image_side {dm.get('max_image_side')}",
             "weights: " + ("; ".join(f"trained {k} {w['path']} ({w['trunk']} measurements)"
                                      for k, w in doc.get("weights", {}).items()) or "random heads"),
             ""]
    hdr = f"{'measurement':40s} {'unit':>9s} {'median':>9s} {'p10':>9s} {'p90':>9s} {'n':>4s} {'peak RSS':>9s} " \
          f"{'threads':>7s}"
    lines += [hdr, "-" * len(hdr)]
    for name, r in doc["results"].items():
        rss = r.get("peak_rss_mb")
        rss_s = f"{rss:.0f} MB" if rss else "-"
        if "error" in r:
            lines.append(f"{name:40s} {'FAILED':>9s}  {r['error'][:80]}")
            continue
        u = r["unit"]
        threads = str(r.get("torch_threads", "-"))
        lines.append(f"{name:40s} {u:>9s} {_fmt(r.get('median'), u):>9s} {_fmt(r.get('p10'), u):>9s} "
                     f"{_fmt(r.get('p90'), u):>9s} {r.get('n', 0):>4d} {rss_s:>9s} {threads:>7s}")
    if doc.get("ratios"):
        lines += ["", "ratios of time per image (same run, same images; < 1: the first is faster)"]
        for k, v in doc["ratios"].items():
            p = v.get("paired")
            lines.append(f"  {k:58s} {v['median_ratio']:7.3f}" + (f"   per-image median {p:.3f}" if p else ""))
    if doc.get("checks"):
        lines += ["", "checks"]
        for k, v in doc["checks"].items():
            if "matched_fraction" in v:
                frac = v["matched_fraction"]
                lines.append(f"  {k}: {'IDENTICAL' if v['identical'] else 'close'}: "
                             f"{'-' if frac is None else f'{100 * frac:.1f}%'} of the top-{v['top']} boxes matched "
                             f"at IoU >= 0.9 ({v['images']} images)")
                continue
            lines.append(f"  {k}: {'IDENTICAL' if v['identical'] else 'DIFFERENT'} ({v['identical_images']}/"
                         f"{v['images']} images identical, max |score diff| {v['max_abs_score_diff']:.3g})")
    return "\n".join(lines)
