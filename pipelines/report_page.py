"""The report's page (pipelines.report): one static HTML file with its style and script inline, reading
data/index.js and, per image shown, data/img_<i>.js (script tags work from file://, where fetch() does not).

Self-check hooks for tests and users: script errors are listed in #errors (and counted in body[data-errors]); once
an image is drawn, body[data-ready] is "1" and body[data-drawn-proposals] holds the number of proposal boxes drawn.
"""

INDEX_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Run report</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 40px;color:#222;max-width:1400px}
h1{font-size:22px;margin:18px 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
nav a{margin-right:14px} table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right} th{background:#f4f4f4} td.l,th.l{text-align:left}
.figs img{max-width:48%;margin-right:1%;border:1px solid #eee} .small{color:#666;font-size:12px}
#viewer{display:flex;gap:18px;align-items:flex-start} #controls label{display:block;margin:6px 0}
#canvas{border:1px solid #ccc;width:640px;max-width:100%} #grid{display:flex;flex-wrap:wrap;gap:4px;margin-top:10px}
#grid img,.gallery img{height:72px;cursor:pointer;border:2px solid transparent} #grid img.cur{border-color:#06c}
.gallery{display:flex;flex-wrap:wrap;gap:6px} .gallery figure{margin:0;text-align:center;font-size:11px}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:420px} #errors{color:#b00;background:#fee}
#errors:empty{display:none}
</style>
<script>
window.REPORT_ERRORS = [];
function reportError(msg) {
  window.REPORT_ERRORS.push(String(msg));
  document.body && (document.body.dataset.errors = window.REPORT_ERRORS.length);
  const e = document.getElementById("errors"); if (e) e.textContent = window.REPORT_ERRORS.join("\n");
}
window.addEventListener("error", ev => reportError(ev.message || ("failed to load " + (ev.target && ev.target.src))),
                        true);
</script>
<script src="data/index.js"></script>
</head><body data-ready="0" data-errors="0" data-drawn-proposals="0">
<pre id="errors"></pre>
<h1 id="title">Run report</h1><div class="small" id="subtitle"></div>
<nav><a href="#fig5">Figure 5</a><a href="#recall">Recall</a><a href="#ap">Per-class AP</a><a href="#images">Images</a>
<a href="#missed">Missed objects</a><a href="#stages">Stage times</a><a href="#config">Config</a></nav>
<h2 id="fig5">Figure 5: detection mAP against the number of proposals</h2>
<div class="figs" id="fig5figs"></div>
<div class="small">mAP x 100 on the test split, mean &plusmn; std over the detector seeds (hover a cell for the
per-seed values). fixed: one detector trained with its train_N proposals, tested at every N; retrain: trained and
tested with N.</div>
<table id="fig5table"></table>
<h2 id="recall">Proposal recall (Figure 4)</h2>
<div class="figs" id="recallfigs"></div>
<table id="recalltable"></table>
<h2 id="ap">Per-class AP (x 100)</h2>
<table id="aptable"></table>
<h2 id="images">Images</h2>
<div id="viewer">
 <div id="controls">
  <label>method <select id="method"></select></label>
  <label>top k proposals <input id="k" type="range" min="0" value="10"> <span id="kval"></span></label>
  <label><input id="showprops" type="checkbox" checked> proposals</label>
  <label><input id="showgt" type="checkbox" checked> ground truth (colour: best IoU with the top k,
   <span style="color:#d22">0</span> .. <span style="color:#2a2">1</span>)</label>
  <label><input id="showmasks" type="checkbox" checked> DeepMask masks (top 8)</label>
  <label><input id="showdets" type="checkbox" checked> detections at N <select id="detn"></select></label>
  <label>score &ge; <input id="thr" type="range" min="0" max="1" step="0.05" value="0.3"> <span id="thrval"></span>
  </label>
  <div class="small" id="info"></div>
 </div>
 <canvas id="canvas" width="640" height="480"></canvas>
</div>
<label>order <select id="order"><option value="id">image id</option>
<option value="worst">worst first (recall@100 of the chosen method)</option></select></label>
<div id="grid"></div><button id="more">more images</button>
<h2 id="missed">Missed objects</h2>
<div class="small" id="missinfo"></div><div id="gallery"></div>
<h2 id="stages">Stage times</h2>
<table id="stagetable"></table>
<h2 id="config">Resolved config</h2>
<pre id="configtext"></pre>
<script>
"use strict";
const R = window.REPORT;
const $ = id => document.getElementById(id);
const cache = {}, PAGE = 200;
let current = 0, pending = null, shown = 0, order = [];

function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls; return e; }
function row(table, cells, head) { const tr = el("tr"); cells.forEach((c, j) => { const td = el(head ? "th" : "td",
  c === null || c === undefined ? "-" : String(c), j === 0 ? "l" : ""); tr.appendChild(td); }); table.appendChild(tr);
  return tr; }
const pct = v => (v === null || v === undefined) ? "-" : (100 * v).toFixed(1);
const label = m => ({deepmask: "DeepMask", selective_search: "SelectiveSearch", random: "random"})[m] || m;

function tables() {
  const T = R.tables;
  $("title").textContent = "Run " + T.name;
  $("subtitle").textContent = `${T.test_images} ${T.test_split} images; methods ${R.methods.map(label).join(", ")}`;
  document.title = "Run report: " + T.name;
  const figs = (names, box) => names.filter(n => R.figures.includes(n)).forEach(n => {
    const i = el("img"); i.src = "fig/" + n; i.alt = n; $(box).appendChild(i); });
  figs(["figure5.png"], "fig5figs"); figs(["recall.png", "recall_iou.png"], "recallfigs");
  const counts = T.counts || [];
  row($("fig5table"), ["method", "protocol", ...counts.map(n => "N=" + n)], true);
  const groups = {};
  T.rows.forEach(r => { const k = r.method + "|" + r.protocol; (groups[k] = groups[k] || {})[r.N] = r; });
  Object.entries(groups).forEach(([k, byN]) => {
    const [m, p] = k.split("|");
    const tr = row($("fig5table"), [label(m), p, ...counts.map(n => byN[n] ? pct(byN[n].mAP) +
      (byN[n].seeds && byN[n].seeds.length > 1 ? " \u00b1 " + pct(byN[n].mAP_std) : "") : null)]);
    counts.forEach((n, j) => { const r = byN[n]; if (r && r.mAP_per_seed) tr.children[j + 2].title =
      r.seeds.map((s, q) => `seed ${s}: ${pct(r.mAP_per_seed[q])}`).join("\n"); });
  });
  const rec = T.recall.summary || {};
  const keys = [...new Set(Object.values(rec).flatMap(o => Object.keys(o)))];
  if (keys.length) { row($("recalltable"), ["method", ...keys], true);
    Object.entries(rec).forEach(([m, o]) => row($("recalltable"), [label(m), ...keys.map(k =>
      o[k] === undefined ? null : o[k].toFixed(3))])); }
  row($("aptable"), ["method", "protocol", "N", "mAP", ...T.classes], true);
  T.rows.forEach(r => row($("aptable"), [label(r.method), r.protocol, r.N, pct(r.mAP),
    ...T.classes.map(c => pct(r.ap[c]))]));
  row($("stagetable"), ["stage", "seconds"], true);
  let total = 0;
  T.stages.forEach(s => { total += s.seconds || 0; row($("stagetable"), [s.stage, s.seconds === null ? null :
    s.seconds.toFixed(1)]); });
  row($("stagetable"), ["total", total.toFixed(1)]);
  $("configtext").textContent = T.config;
}

function controls() {
  R.methods.forEach(m => { const o = el("option", label(m)); o.value = m; $("method").appendChild(o); });
  $("k").max = R.top_k; $("k").value = Math.min(10, R.top_k);
  R.counts.forEach(n => { const o = el("option", String(n)); o.value = n; $("detn").appendChild(o); });
  $("detn").value = R.counts.includes(100) ? 100 : R.counts[R.counts.length - 1];
  ["method", "k", "showprops", "showgt", "showmasks", "showdets", "detn", "thr"].forEach(id =>
    $(id).addEventListener("input", () => { if (id === "method" && $("order").value === "worst") grid(true);
      render(); }));
  $("order").addEventListener("input", () => grid(true));
  $("more").addEventListener("click", () => grid(false));
}

function grid(reset) {
  if (reset) { $("grid").innerHTML = ""; shown = 0; const m = $("method").value;
    order = R.images.slice();
    if ($("order").value === "worst") order.sort((a, b) => (a.recall100[m] ?? 2) - (b.recall100[m] ?? 2)); }
  order.slice(shown, shown + PAGE).forEach(it => {
    const i = el("img"); i.loading = "lazy"; i.src = `thumb/${it.i}.jpg`; i.alt = it.id; i.dataset.i = it.i;
    i.title = `${it.id}: ${it.n_gt} objects, recall@100 ` + Object.entries(it.recall100).map(([m, v]) =>
      `${label(m)} ${v === null ? "-" : v}`).join(", ");
    i.addEventListener("click", () => load(it.i)); $("grid").appendChild(i); });
  shown = Math.min(order.length, shown + PAGE);
  $("more").style.display = shown < order.length ? "" : "none";
}

window.REPORT_IMAGE = function (item) { cache[item.i] = item; if (pending === item.i) { pending = null; render(); } };

function load(i) {
  current = i; location.hash = "i=" + i;
  document.querySelectorAll("#grid img").forEach(g => g.classList.toggle("cur", +g.dataset.i === i));
  if (cache[i]) return render();
  pending = i;
  const s = el("script"); s.src = `data/img_${i}.js`; document.head.appendChild(s);
}

function iou(a, b) {
  const w = Math.min(a[2], b[2]) - Math.max(a[0], b[0]), h = Math.min(a[3], b[3]) - Math.max(a[1], b[1]);
  if (w <= 0 || h <= 0) return 0;
  const inter = w * h, area = x => (x[2] - x[0]) * (x[3] - x[1]);
  return inter / (area(a) + area(b) - inter);
}

const images = {};
function picture(src, done) {
  if (images[src]) { if (images[src].complete) done(images[src]); else images[src].addEventListener("load",
    () => done(images[src])); return; }
  const im = new Image(); images[src] = im; im.onload = () => done(im); im.src = src;
}

function render() {
  const item = cache[current]; if (!item) return;
  const m = $("method").value, k = +$("k").value, thr = +$("thr").value;
  $("kval").textContent = k; $("thrval").textContent = thr.toFixed(2);
  const withMask = $("showmasks").checked && item.masks === m;
  picture(`img/${item.i}.jpg`, base => {
    const finish = mask => {
      const c = $("canvas"), ctx = c.getContext("2d"), s = item.scale;
      c.width = base.naturalWidth; c.height = base.naturalHeight; ctx.drawImage(base, 0, 0);
      if (mask) ctx.drawImage(mask, 0, 0, c.width, c.height);
      const rect = (b, color, width) => { ctx.strokeStyle = color; ctx.lineWidth = width;
        ctx.strokeRect(b[0] * s, b[1] * s, (b[2] - b[0]) * s, (b[3] - b[1]) * s); };
      const props = (item.proposals[m] || []).slice(0, k);
      let drawn = 0;
      if ($("showprops").checked) props.forEach(b => { rect(b, "rgba(0,200,255,0.7)", 1); drawn++; });
      let covered = 0, counted = 0;
      if ($("showgt").checked) item.gt.forEach(g => {
        const best = props.reduce((v, b) => Math.max(v, iou(g, b)), 0);
        if (!g[5]) { counted++; if (best >= 0.5) covered++; }
        rect(g, `hsl(${Math.round(120 * best)},85%,45%)`, 3);
        ctx.fillStyle = "#fff"; ctx.font = "11px sans-serif";
        ctx.fillText(`${g[4]}${g[5] ? " (difficult)" : ""} ${best.toFixed(2)}`, g[0] * s + 3, g[3] * s - 4); });
      let ndet = 0;
      const dets = ((item.dets[m] || {})[$("detn").value] || []).filter(d => d[5] >= thr);
      if ($("showdets").checked) dets.forEach(d => { rect(d, "#ff8c00", 2); ndet++;
        ctx.fillStyle = "#ff8c00"; ctx.font = "bold 12px sans-serif";
        ctx.fillText(`${d[4]} ${d[5].toFixed(2)}`, d[0] * s + 2, d[1] * s + 12); });
      $("info").textContent = `${item.id} (${item.w}x${item.h}): ${item.gt.length} objects, ` +
        (counted ? `${covered}/${counted} covered at IoU .5 by the top ${k}, ` : "") + `${ndet} detections shown`;
      document.body.dataset.drawnProposals = drawn; document.body.dataset.ready = "1";
    };
    if (withMask) picture(`mask/${item.i}.png`, finish); else finish(null);
  });
}

function gallery() {
  $("missinfo").textContent = `Ground-truth objects (not difficult) that no top-${R.miss.top} proposal covers at ` +
    `IoU ${R.miss.iou}, largest first (click one to open its image).`;
  Object.entries(R.gallery).forEach(([m, items]) => {
    $("gallery").appendChild(el("h3", `${label(m)}: ${items.length} shown`));
    const box = el("div", undefined, "gallery");
    items.forEach(g => { const f = el("figure"); const i = el("img"); i.loading = "lazy"; i.src = "miss/" + g.file;
      i.alt = g.class; i.addEventListener("click", () => { load(g.i); $("images").scrollIntoView(); });
      f.appendChild(i); f.appendChild(el("figcaption", `${g.class} ${g.iou.toFixed(2)}`)); box.appendChild(f); });
    $("gallery").appendChild(box);
  });
}

if (!R) reportError("data/index.js did not load");
else {
  tables(); controls(); grid(true); gallery();
  const h = /i=(\d+)/.exec(location.hash);
  if (R.images.length) load(h ? Math.min(+h[1], R.images.length - 1) : R.images[0].i);
}
</script>
</body></html>
"""
