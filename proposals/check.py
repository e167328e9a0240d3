"""The proposal-file checker: is a file in the convention it claims, for these images?

A proposal file in the wrong convention does not fail: it trains and tests a detector on boxes that are shifted,
transposed or scaled, and Figure 5 comes out quietly wrong. `check_proposals` looks at the whole file at once and
names what it finds with short codes; `pipelines.import_proposals` runs it on every import (and alone with
``--check-only``) and refuses the file when a code of the first group below is found.

Every rule is a statistic over all boxes (or all images) of the file, tested against the image sizes of the split,
in this order; each later rule sees the boxes as corrected by the earlier findings, so one problem is not reported
again as another. ``n`` is the number of boxes, ``T = max(5, n / 500)`` the least count that is evidence.

Refused (the importer stops; the message gives the option that fixes it, ``--force`` imports anyway):

``xywh``      boxes declared x1 y1 x2 y2 but >= 5 % of them have x2 < x1 or y2 < y1 (inverted), while read as
              x y w h no width or height is negative (<= 1 %). Real x1 y1 x2 y2 files have ~no inverted boxes; in an
              x y w h file every box narrower than its distance to the left edge looks inverted. Fix ``--layout
              xywh``.
``xyxy``      declared x y w h but no box reads inverted as x1 y1 x2 y2 (< 1 %), and as x y w h >= 5 % of the boxes
              leave the image while as x1 y1 x2 y2 at most a quarter as many do. Fix ``--layout xyxy``.
``yxyx``      (or ``xyxy`` when yxyx was declared) on the images that are not square (sides differ by > 2 %):
              >= 2 % of the boxes leave the image frame (by > 1.5 px) while at most a quarter as many leave the
              transposed frame. Needs >= 10 boxes on non-square images; on square images alone the two layouts
              cannot be told apart (said as a note). Fix ``--layout yxyx`` / ``xyxy``.
``one_based`` the box starts look 1-based: x1 or y1 equal to 1 at least T times, equal to 0 at most 1/20 as often
              (proposals clipped to the image start at 0 in 0-based files; nothing starts at 0 in 1-based ones).
              The ends then tell which 1-based convention: x2 = W (or y2 = H) most often -> Matlab / VOC pixel
              indices (fix ``--base pixels1``), x2 = W + 1 -> every coordinate shifted by one (``--base edges1``).
``zero_based`` declared 1-based (the .mat formats) but x1 or y1 equals 0 at least T times (impossible 1-based).
              Fix ``--base edges0`` (or ``pixels0`` when the ends stop at W - 1).
``end_offset`` the starts agree with the declared base but the ends do not: the most common end value that touches
              the border is W - 1, W or W + 1 (>= T times, the runner-up at most a quarter of it) and it is not the
              declared one (e.g. 0-based inclusive pixel indices, x2 = W - 1, read as edges). Fix ``--base ...``.
``resized``   the boxes fit the frame of the image resized by a common recipe (shorter side 600 with longer side
              <= 1000: Fast R-CNN; 800 / 1333: detectron2, mmdetection; shorter side 600 or 800 alone) far better
              than the image itself: per image, the boxes "fit" a frame when all lie inside it (1.5 px slack) and
              the farthest reaches >= 90 % of its width or height. Refused when >= 60 % of the images fit a resized
              frame and that is >= 30 points more than fit the image. Fix ``--resized SHORT,MAX``.
``outside``   after the fixes above, > 20 % of the boxes leave the image by > 0.5 px (the boxes are not in this
              image's frame: wrong image ids, or a frame the checker does not know; ``--resized`` takes any).
``degenerate`` > 50 % of the boxes have no area after clipping to the image (an unknown layout).
``missing_ids`` images of the split that have no proposals in the file (the store must cover the split: use a split
              file listing only the images you have, or ``--allow-missing`` to store them with no proposals).
``unknown_ids`` refused when no image id of the file is in the split (wrong split, or ids in another form), and for
              files matched by position (mmdet) whose length differs from the split's (the order cannot be trusted).

Warned (imported, with the correction said):

``outside``    up to 20 % of the boxes leave the image: they are clipped to it.
``degenerate`` up to 50 % of the boxes have no area after clipping: they are dropped.
``duplicates`` > 0.1 % of the boxes repeat an earlier box of the same image exactly: kept (they take top-N places).
``unsorted``   in some image the scores increase along the file's order: the store ranks by score (stable);
              ``--rank-by order`` keeps the file's order instead (rank scores replace the file's).
``missing_scores`` the format has scores but this file has none, or every image's scores are all equal: the file
              order is the ranking (rank scores 1 - r/n).
``unknown_ids`` some image ids of the file are not in the split: their proposals are skipped.

Formats without scores (rcnn_mat; hosang_mat files without ``scores``) rank by the file order: said as a note,
not a code. Image ids are matched exactly, else by file stem (``JPEGImages/000005.jpg``), else by integer value
(``5`` -> ``000005``); the note says how many were matched which way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .conventions import BASE_OFFSETS, FRAMES, frame_name, frame_scales, to_xyxy, undo_base

REFUSE = "refuse"
WARN = "warn"


@dataclass
class Finding:
    code: str
    severity: str  # REFUSE | WARN
    message: str
    fix: str = ""

    def as_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "fix": self.fix}


@dataclass
class Report:
    findings: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    declared: dict = field(default_factory=dict)  # layout, base, resized the file was read with
    suggested: dict = field(default_factory=dict)  # the conventions the checker found (same keys)

    @property
    def diagnosis(self) -> list[str]:
        out = []
        for f in self.findings:
            if f.code not in out:
                out.append(f.code)
        return out

    @property
    def refused(self) -> list[str]:
        return [f.code for f in self.findings if f.severity == REFUSE]

    def add(self, code, severity, message, fix=""):
        self.findings.append(Finding(code, severity, message, fix))

    def suggested_args(self) -> list[str]:
        """Command-line options that read the file in the conventions found."""
        args = []
        if self.suggested.get("layout") != self.declared.get("layout"):
            args += ["--layout", self.suggested["layout"]]
        if self.suggested.get("base") != self.declared.get("base"):
            args += ["--base", self.suggested["base"]]
        if self.suggested.get("resized") != self.declared.get("resized") and self.suggested.get("resized"):
            args += ["--resized", self.suggested["resized"]]
        return args

    def as_dict(self) -> dict:
        return {"diagnosis": self.diagnosis, "refused": self.refused,
                "findings": [f.as_dict() for f in self.findings], "notes": list(self.notes),
                "declared": dict(self.declared), "suggested": dict(self.suggested),
                "suggested_args": self.suggested_args(), "stats": dict(self.stats)}


def _outside(b, w, h, tol):
    return (b[:, 0] < -tol) | (b[:, 1] < -tol) | (b[:, 2] > w + tol) | (b[:, 3] > h + tol)


def _frac(mask) -> float:
    return float(np.mean(mask)) if len(mask) else 0.0


def _fit(b, w, h, img, n_img, s, tol=1.5):
    """Fraction of images (with boxes) whose boxes all lie inside the frame (s*w, s*h) and reach >= 90 % of it."""
    fw, fh = (s * w), (s * h)  # per box
    inside = ~_outside(b, fw, fh, tol)
    ok_in = np.ones(n_img, bool)
    np.logical_and.at(ok_in, img, inside)
    ext_x = np.full(n_img, -np.inf)
    ext_y = np.full(n_img, -np.inf)
    np.maximum.at(ext_x, img, b[:, 2] / fw)
    np.maximum.at(ext_y, img, b[:, 3] / fh)
    has = np.zeros(n_img, bool)
    has[img] = True
    ok = ok_in & ((ext_x >= 0.9) | (ext_y >= 0.9)) & has
    return float(ok[has].mean()) if has.any() else 0.0


@dataclass
class _Boxes:
    """Every box of the file as one array, with the size of its image and of the frame its numbers are declared in."""
    raw: np.ndarray  # (n, 4) the file's columns (relative ones scaled to pixels)
    img: np.ndarray  # (n,) index of each box's image
    counts: np.ndarray  # boxes per image
    w: np.ndarray  # per box: image width / height
    h: np.ndarray
    s_decl: np.ndarray  # per box: the declared frame's scale (1 for the image itself)
    fw: np.ndarray  # per box: the declared frame's width / height
    fh: np.ndarray

    @property
    def n(self) -> int:
        return len(self.raw)

    @property
    def n_img(self) -> int:
        return len(self.counts)

    @property
    def evidence(self) -> float:
        return max(5.0, self.n / 500.0)  # T: the least count that is evidence


def _gather(images: dict, sizes: dict, rel_mode: bool, resized) -> _Boxes:
    ids = list(images)
    counts = np.array([len(images[i].boxes) for i in ids], np.int64)
    img = np.repeat(np.arange(len(ids)), counts)
    w = np.array([sizes[i][0] for i in ids], np.float64)[img]
    h = np.array([sizes[i][1] for i in ids], np.float64)[img]
    raw = np.concatenate([images[i].boxes for i in ids]).astype(np.float64) if counts.sum() else np.zeros((0, 4))
    if rel_mode:
        raw = raw * np.stack([w, h, w, h], 1)
    s_decl = frame_scales(w, h, resized) if resized else np.ones(len(raw))
    fw = np.where(s_decl != 1, np.round(s_decl * w), w)
    fh = np.where(s_decl != 1, np.round(s_decl * h), h)
    return _Boxes(raw, img, counts, w, h, s_decl, fw, fh)


def check_proposals(images: dict, sizes: dict, *, layout: str, base: str, resized=None, rel_mode: bool = False,
                    format_has_scores: bool = True, rank_by: str = "score", unknown_ids=(), missing_ids=(),
                    positional: bool = False, allow_missing: bool = False, n_file_images: int | None = None,
                    id_notes=()) -> Report:
    """Diagnose proposals (module docstring): the rules in their order, each on the boxes as corrected so far.

    images: split image id -> formats.RawImage (the file's columns, unconverted), for the ids found in the split;
    sizes: split image id -> (width, height); layout / base / resized: the conventions the file is read with;
    unknown_ids: file ids not in the split; missing_ids: split ids not in the file."""
    rep = Report(declared={"layout": layout, "base": base, "resized": frame_name(resized) if resized else None})
    rep.notes.extend(id_notes)
    bx = _gather(images, sizes, rel_mode, resized)
    rep.stats.update(n_images=bx.n_img, n_boxes=bx.n,
                     n_file_images=n_file_images if n_file_images is not None else bx.n_img,
                     n_unknown_ids=len(unknown_ids), n_missing_ids=len(missing_ids))
    rep.suggested = {"layout": layout, "base": base, "resized": rep.declared["resized"]}
    _check_ids(rep, unknown_ids, missing_ids, positional, allow_missing, bx.n_img)
    if bx.n == 0:
        if bx.n_img:
            rep.add("degenerate", REFUSE, "the file has no boxes for any image of the split")
        return rep
    L = _check_axes(rep, bx, _check_layout(rep, bx, layout))  # 1. x y w h or x1 y1 x2 y2; 2. x / y swapped
    rep.suggested["layout"] = L
    b = _check_base(rep, bx, to_xyxy(bx.raw, L), base)  # 3. 0- or 1-based
    b = _check_frame(rep, bx, b, resized)  # 4. the image itself, or a resized copy
    _check_what_is_left(rep, bx, b)  # 5. outside, degenerate, duplicates
    _check_scores(rep, [images[i].scores for i in images], format_has_scores, rank_by)  # 6. scores
    return rep


def _check_layout(rep: Report, bx: _Boxes, layout: str) -> str:
    """x y w h against x1 y1 x2 y2 (frame-free: inverted boxes); returns the layout found."""
    raw, st = bx.raw, rep.stats
    inv_raw = _frac((raw[:, 2] < raw[:, 0]) | (raw[:, 3] < raw[:, 1]))
    st["inverted_as_xyxy"] = round(inv_raw, 4)
    if layout in ("xyxy", "yxyx") and inv_raw >= 0.05:
        neg_wh = _frac((raw[:, 2] < 0) | (raw[:, 3] < 0))
        if neg_wh <= 0.01:
            rep.add("xywh", REFUSE, f"{100 * inv_raw:.0f}% of the boxes have x2 < x1 or y2 < y1 as {layout}; as "
                    "x y w h none has a negative width or height: the boxes are x, y, width, height",
                    "--layout xywh")
            return "xywh"
    elif layout == "xywh" and inv_raw < 0.01:
        o_wh = _frac(_outside(to_xyxy(raw, "xywh"), bx.fw, bx.fh, 1.5))
        o_xy = _frac(_outside(raw, bx.fw, bx.fh, 1.5))
        st["outside_as_xywh"], st["outside_as_xyxy"] = round(o_wh, 4), round(o_xy, 4)
        if o_wh >= 0.05 and o_xy <= o_wh / 4:
            rep.add("xyxy", REFUSE, f"read as x y w h, {100 * o_wh:.0f}% of the boxes leave the image, as "
                    f"x1 y1 x2 y2 {100 * o_xy:.1f}% and none is inverted: the boxes are x1, y1, x2, y2",
                    "--layout xyxy")
            return "xyxy"
    return layout


def _check_axes(rep: Report, bx: _Boxes, L: str) -> str:
    """Transposed axes, on the images that are not square; returns the layout found."""
    if L not in ("xyxy", "yxyx"):
        return L
    other = "yxyx" if L == "xyxy" else "xyxy"
    nonsq = np.abs(bx.w - bx.h) > 0.02 * np.maximum(bx.w, bx.h)
    rep.stats["boxes_on_non_square_images"] = int(nonsq.sum())
    if nonsq.sum() >= 10:
        fw, fh = bx.fw[nonsq], bx.fh[nonsq]
        oL = _frac(_outside(to_xyxy(bx.raw[nonsq], L), fw, fh, 1.5))
        oT = _frac(_outside(to_xyxy(bx.raw[nonsq], other), fw, fh, 1.5))
        rep.stats["outside_as_declared_axes"], rep.stats["outside_as_swapped_axes"] = round(oL, 4), round(oT, 4)
        if oL >= 0.02 and oT <= oL / 4:
            rep.add(other, REFUSE, f"on the non-square images {100 * oL:.0f}% of the boxes leave the image as "
                    f"{L} but {100 * oT:.1f}% with x and y swapped: the boxes are {other}", f"--layout {other}")
            return other
    elif bx.n_img:
        rep.notes.append("all images with proposals are (nearly) square: x/y swapped boxes cannot be detected")
    return L


_BASE_WHAT = {"edges0": "0-based pixel edges (x2 = W at the right border)",
              "pixels1": "1-based pixel indices (Matlab / VOC: x1 = 1 and x2 = W at the borders)",
              "edges1": "0-based edges shifted by one (x1 = 1 and x2 = W + 1 at the borders)",
              "pixels0": "0-based pixel indices (x2 = W - 1 at the right border)"}


def _check_base(rep: Report, bx: _Boxes, b: np.ndarray, base: str) -> np.ndarray:
    """0- or 1-based (exact integer coordinates at the borders); returns the boxes as 0-based edges."""
    st, T = rep.stats, bx.evidence
    a0 = int(np.sum(b[:, 0] == 0) + np.sum(b[:, 1] == 0))
    a1 = int(np.sum(b[:, 0] == 1) + np.sum(b[:, 1] == 1))
    ends = {d: int(np.sum(b[:, 2] == bx.fw + d) + np.sum(b[:, 3] == bx.fh + d)) for d in (-1, 0, 1)}
    st["starts_at_0"], st["starts_at_1"] = a0, a1
    st["ends_at_W-1"], st["ends_at_W"], st["ends_at_W+1"] = ends[-1], ends[0], ends[1]
    ds, de = BASE_OFFSETS[base]
    start = None
    if a1 >= T and a0 <= a1 / 20:
        start = 1
    elif a0 >= T and a0 >= a1 / 4:
        start = 0
    end = None
    order = sorted(ends, key=lambda d: -ends[d])
    if ends[order[0]] >= T and ends[order[1]] <= ends[order[0]] / 4:
        end = order[0]
    fs = ds if start is None else start
    fe = de if end is None else end
    if fs == 1:
        found = "edges1" if fe >= 1 else "pixels1"
    else:
        found = "pixels0" if fe <= -1 else "edges0"
    if found != base:
        evidence = f"{a0} starts at 0, {a1} at 1; {ends[-1]} ends at W-1, {ends[0]} at W, {ends[1]} at W+1"
        code = "one_based" if fs == 1 and ds == 0 else "zero_based" if fs == 0 and ds == 1 else "end_offset"
        rep.add(code, REFUSE, f"read as {base}, the coordinates look like {_BASE_WHAT[found]} ({evidence})",
                f"--base {found}")
    rep.suggested["base"] = found
    return undo_base(b, found)


def _check_frame(rep: Report, bx: _Boxes, b: np.ndarray, resized) -> np.ndarray:
    """The frame: the image itself, or a resized copy; returns the boxes in image pixels."""
    if resized:
        return b / bx.s_decl[:, None]
    w, h, img, n_img = bx.w, bx.h, bx.img, bx.n_img
    fit1 = _fit(b, w, h, img, n_img, np.ones(bx.n))
    rep.stats["fit_image_frame"] = round(fit1, 3)
    best, best_fit, best_s = None, -1.0, None
    for name, fr in FRAMES.items():
        s = frame_scales(w, h, fr)
        f = _fit(b, w, h, img, n_img, s)
        rep.stats[f"fit_resized_{name}"] = round(f, 3)
        if f > best_fit and np.median(np.abs(s - 1)) > 0.05:
            best, best_fit, best_s = name, f, s
    if best is None or best_fit < 0.6 or best_fit < fit1 + 0.3:
        return b
    rep.add("resized", REFUSE, f"the boxes fit the image resized to shorter side {FRAMES[best][0]}"
            + (f" (longer side <= {FRAMES[best][1]})" if FRAMES[best][1] else "")
            + f" in {100 * best_fit:.0f}% of the images, the image itself in {100 * fit1:.0f}%: they are "
            "coordinates of the resized image", f"--resized {best}")
    rep.suggested["resized"] = best
    return b / best_s[:, None]


def _check_what_is_left(rep: Report, bx: _Boxes, b: np.ndarray) -> None:
    """What is left, in the corrected frame: boxes outside the image, without area, repeated."""
    st, w, h = rep.stats, bx.w, bx.h
    out = _outside(b, w, h, 0.5)
    f_out = _frac(out)
    st["outside"] = round(f_out, 4)
    if f_out > 0:
        sev = REFUSE if f_out > 0.2 else WARN
        rep.add("outside", sev, f"{100 * f_out:.1f}% of the boxes ({int(out.sum())}) leave the image by more than "
                f"0.5 px" + (": they are not in this image's frame (wrong image ids, or boxes of a resized image: "
                             "--resized SHORT,MAX)" if sev == REFUSE else "; they are clipped to the image"),
                "" if sev == WARN else "check the image ids and the frame of the boxes")
    c = b.copy()
    c[:, [0, 2]] = np.clip(c[:, [0, 2]], 0, w[:, None])
    c[:, [1, 3]] = np.clip(c[:, [1, 3]], 0, h[:, None])
    degen = (c[:, 2] <= c[:, 0]) | (c[:, 3] <= c[:, 1])
    f_deg = _frac(degen)
    st["degenerate"] = round(f_deg, 4)
    if f_deg > 0:
        sev = REFUSE if f_deg > 0.5 else WARN
        rep.add("degenerate", sev, f"{100 * f_deg:.1f}% of the boxes ({int(degen.sum())}) have no area inside the "
                "image" + ("; they are dropped" if sev == WARN else ": the layout is not one the checker knows"))
    starts = np.concatenate([[0], np.cumsum(bx.counts)])
    n_dup = sum(int(m) - len(np.unique(b[s:s + m], axis=0)) for s, m in zip(starts, bx.counts) if m > 1)
    st["duplicates"] = n_dup
    if n_dup >= 1 and n_dup > 0.001 * bx.n:
        rep.add("duplicates", WARN, f"{n_dup} boxes ({100 * n_dup / bx.n:.1f}%) repeat an earlier box of the same "
                "image exactly; they are kept and take places in every top N", "remove exact duplicates")


def _check_scores(rep: Report, scores: list, format_has_scores: bool, rank_by: str) -> None:
    """Scores: missing, all equal, or rising along the file."""
    st = rep.stats
    if not format_has_scores:
        rep.notes.append("this format has no scores: the file's order is the ranking")
        return
    if any(s is None for s in scores):
        rep.add("missing_scores", WARN, "the file has no scores: its order is taken as the ranking")
        return
    multi = [s for s in scores if len(s) > 1]
    if not multi:
        return
    const = _frac(np.array([np.all(s == s[0]) for s in multi]))
    unsorted = np.array([bool(np.any(np.diff(s) > 0)) for s in multi])
    inc = np.concatenate([np.diff(s) > 0 for s in multi])
    st["images_with_constant_scores"] = round(const, 3)
    st["images_unsorted"] = round(_frac(unsorted), 3)
    st["increasing_score_steps"] = round(_frac(inc), 4)
    if const >= 0.9:
        rep.add("missing_scores", WARN, f"in {100 * const:.0f}% of the images all scores are equal: they "
                "rank nothing; the file's order is taken as the ranking")
    elif unsorted.any():
        how = ("the store ranks by score (stable): pass --rank-by order if the file's order is your ranking"
               if rank_by == "score" else "--rank-by order: the file's order is kept, the scores replaced "
               "by rank scores")
        rep.add("unsorted", WARN, f"in {100 * _frac(unsorted):.0f}% of the images the scores rise along "
                f"the file ({100 * _frac(inc):.0f}% of the steps): {how}",
                "--rank-by order" if rank_by == "score" else "")


def _check_ids(rep: Report, unknown, missing, positional, allow_missing, n_known) -> None:
    def by_position(code, n, what):
        rep.add(code, REFUSE, f"the file has {n} entries {what} than the split has images (entries are matched to "
                "the split by position: it was made for another image list)", "use the split the file was made for")

    if unknown:
        ex = ", ".join(repr(u) for u in list(unknown)[:3])
        if positional:
            by_position("unknown_ids", len(unknown), "more")
        elif n_known == 0:
            rep.add("unknown_ids", REFUSE, f"none of the file's image ids is in the split (e.g. {ex}): another "
                    "split or dataset, or ids in another form", "give the split the file was made for")
        else:
            rep.add("unknown_ids", WARN, f"{len(unknown)} image ids of the file are not in the split (e.g. {ex}); "
                    "their proposals are skipped")
    if missing:
        ex = ", ".join(repr(m) for m in list(missing)[:3])
        if positional:
            by_position("missing_ids", len(missing), "fewer")
        elif allow_missing:
            rep.add("missing_ids", WARN, f"{len(missing)} images of the split have no proposals in the file "
                    f"(e.g. {ex}); --allow-missing: they are stored with none")
        else:
            rep.add("missing_ids", REFUSE, f"{len(missing)} images of the split have no proposals in the file "
                    f"(e.g. {ex})", "--allow-missing (stores them with no proposals), or a split of the images "
                    "you have")
