// Field inspection page logic (offline; runs on the Bokeh models embedded in the page).
// The pixel cube is the Float32Array `cube_raw.data.flux` (pixel-major: flux[p * n_time + t]);
// light-curve sets are `lcsets.data.<raw|lfd|cpm|dbl>` (dbl: deblended + de-trended) (source-major: flux[s * n_time + t]).
(function () {
  "use strict";
  const RPT = (window.RPT = window.RPT || {});
  RPT.ready = false;
  RPT.errors = [];
  const NAMES = ["cube_raw", "cube_cpm", "pixels", "lc", "lcsets", "sources", "srclc", "cadence_slider",
    "stretch_slider", "stretch_mode", "image_mode", "tap_mode", "lc_mode", "play_toggle", "status", "span_main",
    "span_raw", "span_lfd", "span_cpm", "span_dbl", "mapper_log", "mapper_lin", "pixel_renderer", "colorbar", "lc_fig",
    "source_title", "srcfig_raw", "srcfig_lfd", "srcfig_cpm", "srcfig_dbl", "auto_stretch"];

  function setColumns(source, cols) {
    const d = Object.assign({}, source.data);
    for (const k in cols) d[k] = cols[k];
    source.data = d;
  }

  RPT.init = function (doc) {
    RPT.doc = doc;
    RPT.meta = JSON.parse(document.getElementById("rpt-meta").textContent);
    const m = (RPT.m = {});
    for (const n of NAMES) m[n] = doc.get_model_by_name(n);
    RPT.nt = RPT.meta.n_time;
    RPT.np = RPT.meta.n_pix;
    RPT.cube = "raw";
    RPT.pixIndex = new Map();
    const x = m.pixels.data.x, y = m.pixels.data.y;
    for (let i = 0; i < x.length; i++) RPT.pixIndex.set(x[i] + "," + y[i], i);
    RPT.onSource();
    RPT.onMask();
    RPT.onCadence();
    RPT.ready = true;
    document.body.setAttribute("data-rpt-ready", "1");
    const h = window.location.hash;
    if (h.startsWith("#source=")) RPT.selectSourceId(h.slice(8));
  };

  RPT.cubeArray = function () {
    const c = RPT.m["cube_" + RPT.cube];
    return c ? c.data.flux : RPT.m.cube_raw.data.flux;
  };

  RPT.frame = function (t) {
    const cube = RPT.cubeArray(), nt = RPT.nt, out = new Float32Array(RPT.np);
    for (let p = 0; p < RPT.np; p++) out[p] = cube[p * nt + t];
    return out;
  };

  // Sum of the selected pixels' series (NaN-skipping; NaN where every selected pixel is NaN).
  RPT.pixelSum = function (indices) {
    const cube = RPT.cubeArray(), nt = RPT.nt;
    const out = new Float64Array(nt), n = new Int32Array(nt);
    const idx = Array.from(indices).sort((a, b) => a - b);
    for (const p of idx) {
      const o = p * nt;
      for (let t = 0; t < nt; t++) {
        const v = cube[o + t];
        if (v === v) { out[t] += v; n[t] += 1; }
      }
    }
    for (let t = 0; t < nt; t++) if (n[t] === 0) out[t] = NaN;
    return out;
  };

  RPT.sourceSeries = function (set, s) {
    const col = RPT.m.lcsets.data[set];
    if (!col || s == null || s < 0) return null;
    // (copy: typed-array views of BokehJS NDArrays do not honour offsets)
    const nt = RPT.nt, out = new Float64Array(nt), o = s * nt;
    for (let t = 0; t < nt; t++) out[t] = col[o + t];
    return out;
  };

  RPT.nanArray = function () { return new Float64Array(RPT.nt).fill(NaN); };

  RPT.currentLc = function () {
    const mode = ["pixels", "lfd", "cpm"][RPT.m.lc_mode.active];
    if (mode === "pixels") return { mode: mode, flux: RPT.pixelSum(RPT.m.pixels.selected.indices) };
    const s = RPT.sourceSeries(mode, RPT.src);
    return { mode: mode, flux: s ? s : RPT.nanArray() };
  };

  RPT.updateLc = function () {
    const lc = RPT.currentLc();
    RPT.lcFlux = lc.flux;
    setColumns(RPT.m.lc, { flux: lc.flux });
    const title = { pixels: "light curve: aperture sum of the selected pixels" + (RPT.cube === "cpm" ? " (CPM de-trended cube)" : ""),
      lfd: "light curve: LFD flux of the selected source", cpm: "light curve: CPM flux of the selected source" }[lc.mode];
    if (RPT.m.lc_fig && RPT.m.lc_fig.title) RPT.m.lc_fig.title.text = title;
    if (!RPT.m.lcsets.data.raw) setColumns(RPT.m.srclc, { raw: RPT.pixelSum(RPT.m.pixels.selected.indices) });
  };

  RPT.onCadence = function () {
    const m = RPT.m, t = m.cadence_slider.value | 0;
    RPT.t = t;
    setColumns(m.pixels, { flux: RPT.frame(t) });
    if (m.auto_stretch && m.auto_stretch.active) RPT.autoStretch();
    const time = m.lc.data.time[t];
    for (const n of ["span_main", "span_raw", "span_lfd", "span_cpm", "span_dbl"]) if (m[n]) m[n].location = time;
    RPT.updateStatus();
  };

  // q-th percentile (0-100) of the finite values, linear interpolation (numpy's default)
  RPT.percentile = function (values, q) {
    const v = Array.from(values).filter((x) => x === x).sort((a, b) => a - b);
    if (!v.length) return NaN;
    const pos = (q / 100) * (v.length - 1), i = Math.floor(pos), f = pos - i;
    return i + 1 < v.length ? v[i] + f * (v[i + 1] - v[i]) : v[i];
  };

  // per-frame auto stretch: the configured percentiles of the frame shown (slider range widened if needed)
  RPT.autoStretch = function () {
    const m = RPT.m, s = m.stretch_slider, pc = RPT.meta.percentiles || [1, 95];
    const f = m.pixels.data.flux;
    const lo = RPT.percentile(f, pc[0]);
    let hi = RPT.percentile(f, pc[1]);
    if (!(lo === lo && hi === hi)) return;
    if (hi <= lo) hi = lo + 1e-6 * Math.max(1, Math.abs(lo));
    if (lo < s.start) s.start = lo;
    if (hi > s.end) s.end = hi;
    s.value = [lo, hi];
  };

  RPT.onAutoStretch = function () {
    if (RPT.m.auto_stretch && RPT.m.auto_stretch.active) RPT.autoStretch();
  };

  RPT.onMask = function () {
    RPT.updateLc();
    RPT.updateStatus();
  };

  RPT.onSource = function () {
    const m = RPT.m;
    const sel = m.sources ? m.sources.selected.indices : [];
    RPT.src = sel.length ? sel[0] : null;
    const cols = {};
    for (const k of ["raw", "lfd", "cpm", "dbl"]) {
      const s = RPT.sourceSeries(k, RPT.src);
      if (s) cols[k] = s;
      else if (k !== "raw") cols[k] = RPT.nanArray();
    }
    if (!m.lcsets.data.raw) cols.raw = RPT.pixelSum(m.pixels.selected.indices);
    setColumns(m.srclc, cols);
    if (m.source_title) {
      if (RPT.src == null) m.source_title.text = "<b>Selected source</b>: none (tap a source or a table row)";
      else {
        const d = m.sources.data, i = RPT.src;
        const g = d.gmag[i], c = d.contamination[i];
        m.source_title.text = "<b>Gaia DR3 " + d.source_id[i] + "</b> G=" + (g === g ? g.toFixed(2) : "?") +
          " at column " + d.column[i].toFixed(2) + ", row " + d.row[i].toFixed(2) +
          (c === c ? ", contamination " + c.toFixed(3) : "");
      }
    }
    if (m.lc_mode && m.lc_mode.active !== 0) RPT.updateLc();
    RPT.updateStatus();
  };

  RPT.selectSourceId = function (id) {
    const ids = RPT.m.sources ? RPT.m.sources.data.source_id : [];
    const i = Array.prototype.indexOf.call(ids, String(id));
    if (i >= 0) RPT.m.sources.selected.indices = [i];
    return i;
  };

  RPT.updateStatus = function () {
    const m = RPT.m;
    if (!m.status) return;
    const t = RPT.t | 0, d = m.lc.data;
    const nsel = m.pixels.selected.indices.length;
    const f = RPT.lcFlux ? RPT.lcFlux[t] : NaN;
    m.status.text = "cadence index <b>" + t + "</b> (cadenceno " + d.cadenceno[t] + "), time " +
      d.time[t].toFixed(5) + " " + RPT.meta.time_system + ", flux " + (f === f ? f.toFixed(2) : "NaN") +
      " e-/s &middot; <span id='rpt-npix'>" + nsel + "</span> pixel(s) selected" +
      (RPT.meta.bin_factor > 1 ? " &middot; display bins of " + RPT.meta.bin_factor + " cadences" : "");
  };

  RPT.step = function (k) {
    const s = RPT.m.cadence_slider;
    s.value = Math.min(s.end, Math.max(s.start, (s.value | 0) + k));
  };

  RPT.play = function (on) {
    if (RPT.timer) { clearInterval(RPT.timer); RPT.timer = null; }
    const tog = RPT.m.play_toggle;
    if (on) {
      RPT.timer = setInterval(function () {
        const s = RPT.m.cadence_slider;
        s.value = (s.value | 0) >= s.end ? s.start : (s.value | 0) + 1;
      }, RPT.meta.play_interval_ms);
      if (tog) tog.label = "❚❚ Pause";
    } else if (tog) tog.label = "► Play";
  };

  // nearest cadence to time x (binary search on the sorted, possibly NaN-free time column)
  RPT.seek = function (x) {
    const time = RPT.m.lc.data.time;
    let lo = 0, hi = time.length - 1;
    while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (time[mid] < x) lo = mid; else hi = mid; }
    const i = Math.abs(time[lo] - x) <= Math.abs(time[hi] - x) ? lo : hi;
    RPT.m.cadence_slider.value = i;
    return i;
  };

  RPT.tapImage = function (ev) {
    const m = RPT.m;
    RPT.taps = (RPT.taps || []).concat([[ev.x, ev.y, !!(ev.modifiers && ev.modifiers.shift)]]).slice(-20);
    if (m.tap_mode && m.tap_mode.active === 1) {
      const d = m.sources.data;
      let best = -1, bd = 1.5;
      for (let i = 0; i < d.x.length; i++) {
        const dd = Math.hypot(d.x[i] - ev.x, d.y[i] - ev.y);
        if (dd < bd) { bd = dd; best = i; }
      }
      if (best >= 0) m.sources.selected.indices = [best];
      return;
    }
    const key = Math.round(ev.x) + "," + Math.round(ev.y);
    if (!RPT.pixIndex.has(key)) return;
    const p = RPT.pixIndex.get(key);
    const shift = ev.modifiers && ev.modifiers.shift;
    let sel = Array.from(m.pixels.selected.indices);
    if (shift) {
      const j = sel.indexOf(p);
      if (j >= 0) sel.splice(j, 1); else sel.push(p);
    } else sel = [p];
    m.pixels.selected.indices = sel;
  };

  RPT.onImageMode = function () {
    const m = RPT.m;
    RPT.cube = m.image_mode.active === 1 && m.cube_cpm ? "cpm" : "raw";
    const st = RPT.meta.stretch[RPT.cube];
    const s = m.stretch_slider;
    s.start = st.vlo; s.end = st.vhi; s.step = (st.vhi - st.vlo) / 500; s.value = [st.lo, st.hi];
    m.stretch_mode.active = RPT.cube === "cpm" ? 1 : 0;
    RPT.onStretch();
    RPT.onCadence();
    RPT.updateLc();
  };


  RPT.onStretch = function () {
    const m = RPT.m, v = m.stretch_slider.value, st = RPT.meta.stretch[RPT.cube];
    const lo = Math.max(v[0], st.pos);
    m.mapper_log.low = lo;
    m.mapper_log.high = Math.max(v[1], lo * 1.0001);
    m.mapper_lin.low = v[0];
    m.mapper_lin.high = v[1];
  };

  RPT.onStretchMode = function () {
    const m = RPT.m, r = m.pixel_renderer;
    const mapper = m.stretch_mode.active === 0 ? m.mapper_log : m.mapper_lin;
    const spec = { field: "flux", transform: mapper };
    for (const g of [r.glyph, r.selection_glyph, r.nonselection_glyph]) if (g) g.fill_color = spec;
    if (m.colorbar) m.colorbar.color_mapper = mapper;
  };

  RPT.onLcMode = function () { RPT.updateLc(); RPT.updateStatus(); };

  RPT.download = function (name, text, mime) {
    const blob = new Blob([text], { type: mime });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  };

  RPT.maskObject = function () {
    const m = RPT.m, meta = RPT.meta;
    const rows = meta.grid_rows, cols = meta.grid_cols;
    const mask = rows.map(() => cols.map(() => false));
    const pixels = [];
    const d = m.pixels.data;
    const idx = Array.from(m.pixels.selected.indices).sort((a, b) => a - b);
    for (const p of idx) {
      const r = d.row[p], c = d.column[p];
      mask[rows.indexOf(r)][cols.indexOf(c)] = true;
      pixels.push({ row: r, column: c });
    }
    return { field: meta.field, mission: meta.mission, rows: rows, columns: cols, mask: mask, pixels: pixels,
      note: "mask[i][j] is true when CCD pixel (rows[i], columns[j]) is selected" };
  };

  RPT.exportMask = function () {
    RPT.download(RPT.meta.field + "_mask.json", JSON.stringify(RPT.maskObject(), null, 1), "application/json");
  };

  RPT.lcCsv = function () {
    const d = RPT.m.lc.data, lc = RPT.currentLc();
    const src = RPT.src != null ? RPT.m.sources.data.source_id[RPT.src] : "";
    const lines = ["# field " + RPT.meta.field + "; light curve: " + lc.mode +
      (lc.mode === "pixels" ? " (" + RPT.cube + " cube, " + RPT.m.pixels.selected.indices.length + " pixels)" : " (Gaia DR3 " + src + ")") +
      "; time " + RPT.meta.time_system + "; flux e-/s" + (RPT.meta.bin_factor > 1 ? "; bins of " + RPT.meta.bin_factor + " cadences" : ""),
      "cadenceno,time,flux,quality"];
    for (let t = 0; t < RPT.nt; t++) {
      const f = lc.flux[t];
      lines.push(d.cadenceno[t] + "," + d.time[t] + "," + (f === f ? f : "nan") + "," + d.quality[t]);
    }
    return lines.join("\n") + "\n";
  };

  RPT.exportLc = function () {
    RPT.download(RPT.meta.field + "_lightcurve.csv", RPT.lcCsv(), "text/csv");
  };

  // keyboard: left/right arrows step one cadence (not while typing in an input). A focused slider keeps its
  // own keys (the cadence slider steps one cadence itself; the stretch slider moves only the stretch): the
  // event is looked up along its composed path, since Bokeh's widgets live in shadow roots.
  document.addEventListener("keydown", function (e) {
    if (!RPT.ready) return;
    const tag = (e.target && e.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    const path = e.composedPath ? e.composedPath() : [];
    for (const el of path) {
      if (el && el.getAttribute && (el.getAttribute("role") === "slider" || el.tagName === "INPUT")) return;
    }
    if (e.key === "ArrowRight") { RPT.step(1); e.preventDefault(); }
    else if (e.key === "ArrowLeft") { RPT.step(-1); e.preventDefault(); }
  });

  window.addEventListener("hashchange", function () {
    const h = window.location.hash;
    if (RPT.ready && h.startsWith("#source=")) RPT.selectSourceId(decodeURIComponent(h.slice(8)));
  });

  window.addEventListener("error", function (e) { RPT.errors.push(String(e.message)); });

  (function wait() {
    try {
      const B = window.Bokeh;
      if (B && B.documents && B.documents.length && B.documents[0].get_model_by_name("cadence_slider")) {
        RPT.init(B.documents[0]);
        return;
      }
    } catch (err) { RPT.errors.push(String(err)); return; }
    setTimeout(wait, 30);
  })();
})();
