"""Figures of the paper, drawn from the sweep's JSON: Figure 5 (mAP vs number of proposals), Figure 4 (average
recall vs number of proposals) and its localisation panels (g-i: recall vs IoU threshold; with Hosang et al.'s
recall at IoU .5 / .7 and AR vs number of proposals)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.io import atomic_write_bytes  # noqa: E402

LABELS = {"deepmask": "DeepMask", "selective_search": "SelectiveSearch", "random": "random boxes"}
COLORS = {"deepmask": "tab:red", "selective_search": "tab:blue", "random": "tab:gray"}
# The paper's Figure 5 anchors (Fast R-CNN VGG16, VOC07 test): drawn only on request, for the paper config.
PAPER_FIG5 = {"deepmask": {100: 68.2, 500: 69.9}, "selective_search": {2000: 66.9}}
_MORE_COLORS = ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def label(method: str) -> str:
    """Legend name: the known methods by name, an imported store's by its name ('mine (imported)')."""
    if method.startswith("imported:"):
        return f"{method[len('imported:'):]} (imported)"
    return LABELS.get(method, method)


def _colors(methods) -> dict:
    """Fixed colours for the known methods; the others (imported stores) take distinct ones in order."""
    out, k = {}, 0
    for m in methods:
        if m in COLORS:
            out[m] = COLORS[m]
        else:
            out[m] = _MORE_COLORS[k % len(_MORE_COLORS)]
            k += 1
    return out


def _save(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_figure5(rows: list[dict], path, title: str = "Fast R-CNN mAP vs number of proposals",
                 paper: bool = False) -> None:
    """rows: [{'method', 'N', 'mAP', optional 'mAP_std', 'mAP_per_seed'}]; mAP in [0, 1], plotted in percent on
    a log-N axis; with several detector seeds, the mean with +-1 std error bars and each seed's value as a dot."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    methods = sorted({r["method"] for r in rows})
    colors = _colors(methods)
    for method in methods:
        rs = sorted((r for r in rows if r["method"] == method and r.get("protocol") == "retrain"),
                    key=lambda r: r["N"])
        if not rs:
            continue
        n_seeds = max(len(r.get("mAP_per_seed", [0])) for r in rs)
        ax.errorbar([r["N"] for r in rs], [100 * r["mAP"] for r in rs],
                    yerr=[100 * r.get("mAP_std", 0.0) for r in rs] if n_seeds > 1 else None, fmt="s", ms=8,
                    mfc="none", capsize=3, color=colors[method], label=f"{label(method)}, re-trained at N")
    for method in methods:
        rs = sorted((r for r in rows if r["method"] == method and r.get("protocol", "fixed") == "fixed"),
                    key=lambda r: r["N"])
        if not rs:
            continue
        n_seeds = max(len(r.get("mAP_per_seed", [0])) for r in rs)
        name = label(method) + f", trained at {_top(rs[0].get('train_N', 0))}" + (
            f" (mean \u00b1 std, {n_seeds} seeds)" if n_seeds > 1 else "")
        ax.errorbar([r["N"] for r in rs], [100 * r["mAP"] for r in rs],
                    yerr=[100 * r.get("mAP_std", 0.0) for r in rs] if n_seeds > 1 else None, fmt="o-", capsize=3,
                    label=name, color=colors[method])
        if n_seeds > 1:
            xs = [r["N"] for r in rs for _ in r["mAP_per_seed"]]
            ax.plot(xs, [100 * v for r in rs for v in r["mAP_per_seed"]], ".", ms=3, alpha=0.5,
                    color=colors[method])
        if paper and method in PAPER_FIG5:
            ref = sorted(PAPER_FIG5[method].items())
            ax.plot([p[0] for p in ref], [p[1] for p in ref], "x", color=COLORS.get(method), ms=9,
                    label=f"{LABELS.get(method, method)} (paper)")
    ax.set_xscale("log")
    ax.set_xlabel("number of proposals per image")
    ax.set_ylabel("mAP (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    # beside the axes: inside, with three methods, it hid the low-N points (savefig's tight box keeps it)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    _save(fig, path)


def _top(n: int) -> str:
    return "all" if not n else str(n)


def plot_recall(curves: dict, path, title: str = "Average recall vs number of proposals") -> None:
    """curves: {'box': {method: {'counts': [...], 'AR': [...]}}, 'segm': {...}} -> one panel per IoU type."""
    kinds = [k for k in ("box", "segm") if curves.get(k)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.0 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        colors = _colors(sorted(curves[kind]))
        for method, c in sorted(curves[kind].items()):
            ax.plot(c["counts"], c["AR"], "-", label=label(method), color=colors[method])
        ax.set_xscale("log")
        ax.set_xlabel("number of proposals")
        ax.set_ylabel("average recall")
        ax.set_title(f"{'box' if kind == 'box' else 'segmentation'} proposals", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_localization(curves: dict, path, title: str = "Proposal localisation") -> None:
    """curves: {method: proposals.recall.localization_curves(...)} -> 2 x 3 panels: recall vs IoU threshold at each
    count of 'recall_vs_iou' (paper Fig. 4 g-i: 10, 100, 1000 proposals); recall at IoU .5 and at .7, and AR, vs the
    number of proposals (Hosang et al.)."""
    methods = sorted(curves)
    colors = _colors(methods)
    counts = sorted({int(c) for m in methods for c in curves[m]["recall_vs_iou"]})[:3]
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 7.6), squeeze=False)
    for k in range(3):
        ax = axes[0][k]
        if k >= len(counts):
            ax.set_visible(False)
            continue
        for m in methods:
            y = curves[m]["recall_vs_iou"].get(str(counts[k]))
            if y is not None:
                ax.plot(curves[m]["iou"], [float("nan") if v is None else v for v in y], "-", label=label(m),
                        color=colors[m])
        ax.set_xlim(0.5, 1.0)
        ax.set_ylim(0, 1)
        ax.set_xlabel("IoU threshold")
        ax.set_ylabel("recall")
        ax.set_title(f"{counts[k]} proposals", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax, key, ylab in zip(axes[1], ("recall@0.5", "recall@0.7", "AR"),
                             ("recall at IoU 0.5", "recall at IoU 0.7", "average recall (IoU .5:.95)")):
        for m in methods:
            ax.plot(curves[m]["counts"], [float("nan") if v is None else v for v in curves[m][key]], "-",
                    label=label(m), color=colors[m])
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("number of proposals")
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def ensure_dir(path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p
