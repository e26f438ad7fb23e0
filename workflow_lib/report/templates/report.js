// Field inspection page logic (offline; runs on the Bokeh models embedded in the page).
// The cubes (raw, err = flux_err, cpm = CPM de-trended) and the light-curve sets (raw, lfd, cpm, dbl) are loaded on
// demand from the data folder beside the page (workflow_lib/report/datafiles.py): each file is a script calling
// RPT.chunk(key, base64 float32). Cube block "<cube>_g<g>_c<c>": pixel group g (the pixels' `group` column), time
// chunk c (meta.data.chunk cadences), pixel-major by the pixels' `slot`. Set file "lc_<set>_s<k>": sources
// k*per_file.., their flux then their flux_err, source-major. Loaded blocks are kept up to meta.data.cache_mb.
(function () {
  "use strict";
  const RPT = (window.RPT = window.RPT || {});
  RPT.ready = false;
  RPT.errors = [];
  RPT.timing = { script: performance.now() }; // ms since navigation: this script ran, init began, page interactive
  RPT.cache = new Map(); // key -> Float32Array, least recently used first
  RPT.cacheBytes = 0;
  RPT.waiting = new Map(); // key -> {promise, resolve, reject, el}
  RPT.pinned = new Map(); // key -> number of operations that need it now
  RPT.pending = 0; // operations waiting for data
  const NAMES = ["pixels", "lc", "sources", "srclc", "cadence_slider",
    "stretch_slider", "stretch_mode", "image_mode", "tap_mode", "lc_mode", "play_toggle", "status", "span_main",
    "span_raw", "span_lfd", "span_cpm", "span_dbl", "mapper_log", "mapper_lin", "pixel_renderer", "colorbar", "lc_fig",
    "source_title", "srcfig_raw", "srcfig_lfd", "srcfig_cpm", "srcfig_dbl", "auto_stretch", "lc_renderer"];
  const SET_LABELS = { raw: "RAW aperture", lfd: "LFD", cpm: "CPM", dbl: "LFD+CPM" };

  function setColumns(source, cols) {
    const d = Object.assign({}, source.data);
    for (const k in cols) d[k] = cols[k];
    source.data = d;
  }

  RPT.init = function (doc) {
    RPT.timing.init = performance.now();
    RPT.doc = doc;
    RPT.meta = JSON.parse(document.getElementById("rpt-meta").textContent);
    RPT.D = RPT.meta.data;
    const m = (RPT.m = {});
    for (const n of NAMES) m[n] = doc.get_model_by_name(n);
    RPT.nt = RPT.meta.n_time;
    RPT.np = RPT.meta.n_pix;
    RPT.cube = "raw";
    RPT.setTitles = {};
    for (const k of ["raw", "lfd", "cpm", "dbl"]) RPT.setTitles[k] = m["srcfig_" + k] ? m["srcfig_" + k].title.text : k;
    RPT.pixIndex = new Map();
    const x = m.pixels.data.x, y = m.pixels.data.y;
    for (let i = 0; i < x.length; i++) RPT.pixIndex.set(x[i] + "," + y[i], i);
    const h = window.location.hash;
    if (h.startsWith("#source=")) RPT.selectSourceId(decodeURIComponent(h.slice(8)));
    // a small page loads all its pixels and light curves at once (everything answers at once afterwards);
    // a large one loads what is shown first, and the rest on demand
    if (RPT.dataBytes() <= RPT.PRELOAD_MB * 1e6) RPT.need(RPT.allKeys(), function () {});
    RPT.onSource();
    RPT.onMask();
    RPT.onCadence();
    // interactive now: the first frame, light curve and source panels are in the page itself; the blocks
    // loading in the background (RPT.pending) replace them with the same numbers
    RPT.ready = true;
    RPT.timing.ready = performance.now();
    document.body.setAttribute("data-rpt-ready", "1");
    RPT.updateStatus();
    RPT.whenIdle(function () { document.body.setAttribute("data-rpt-loaded", "1"); });
    setTimeout(RPT.renderDiagnostics, 0);
  };

  // the diagnostics document (quality flags, motion model, overview, mean-frame residual): rendered after the
  // page is interactive, its time axis kept to the light curve's
  RPT.renderDiagnostics = function () {
    const src = document.getElementById("rpt-diag");
    if (!src) { document.body.setAttribute("data-rpt-diag", "1"); return; }
    const n = Bokeh.documents.length, el = document.createElement("script");
    el.text = src.textContent;
    document.body.appendChild(el);
    (function wait() {
      if (Bokeh.documents.length > n) {
        RPT.diag = Bokeh.documents[Bokeh.documents.length - 1];
        RPT.diagRange = RPT.diag.get_model_by_name("diag_x_range");
        RPT.syncTime();
        document.body.setAttribute("data-rpt-diag", "1");
      } else setTimeout(wait, 20);
    })();
  };

  RPT.syncTime = function () {
    const r = RPT.diagRange, x = RPT.m && RPT.m.lc_fig ? RPT.m.lc_fig.x_range : null;
    if (!r || !x || !(x.start === x.start && x.end === x.end)) return;
    if (r.start !== x.start) r.start = x.start;
    if (r.end !== x.end) r.end = x.end;
  };

  // a model of either document by name
  RPT.model = function (name) {
    for (const d of Bokeh.documents) { const m = d.get_model_by_name(name); if (m) return m; }
    return null;
  };

  // ---------------------------------------------------------------- data blocks (the page's data folder)
  RPT.PRELOAD_MB = 48;

  RPT.dataBytes = function () {
    const D = RPT.D, cubes = D.cubes.filter((c) => c !== "err").length;
    return 4 * RPT.nt * (RPT.np * cubes + 2 * RPT.meta.n_sources * D.sets.length);
  };

  RPT.allKeys = function () {
    const D = RPT.D, keys = [];
    for (const cube of D.cubes) {
      if (cube === "err") continue;
      for (let c = 0; c < D.n_chunks; c++) for (let g = 0; g < D.group_size.length; g++) keys.push(RPT.cubeKey(cube, g, c));
    }
    for (const set of D.sets) for (let k = 0; k * D.per_file < RPT.meta.n_sources; k++) keys.push(RPT.fileKey(set, k));
    return keys;
  };

  // called by every data file: decode the block and hand it to whoever waits for it
  RPT.chunk = function (key, b64) {
    const bin = atob(b64), n = bin.length, u8 = new Uint8Array(n);
    for (let i = 0; i < n; i++) u8[i] = bin.charCodeAt(i);
    const arr = new Float32Array(u8.buffer);
    RPT.put(key, arr);
    const w = RPT.waiting.get(key);
    if (w) { RPT.waiting.delete(key); w.el.remove(); w.resolve(arr); }
  };

  RPT.put = function (key, arr) {
    if (RPT.cache.has(key)) { RPT.cacheBytes -= RPT.cache.get(key).byteLength; RPT.cache.delete(key); }
    RPT.cache.set(key, arr);
    RPT.cacheBytes += arr.byteLength;
    const cap = (RPT.D.cache_mb || 160) * 1e6;
    for (const k of RPT.cache.keys()) { // drop the least recently used blocks no operation needs now
      if (RPT.cacheBytes <= cap) break;
      if (RPT.pinned.has(k)) continue;
      RPT.cacheBytes -= RPT.cache.get(k).byteLength;
      RPT.cache.delete(k);
    }
  };

  RPT.get = function (key) {
    const a = RPT.cache.get(key);
    if (a) { RPT.cache.delete(key); RPT.cache.set(key, a); }
    return a;
  };

  RPT.load = function (key) {
    if (RPT.cache.has(key)) return Promise.resolve(RPT.get(key));
    if (RPT.waiting.has(key)) return RPT.waiting.get(key).promise;
    const w = {};
    w.promise = new Promise(function (resolve, reject) { w.resolve = resolve; w.reject = reject; });
    const src = RPT.D.dir + "/" + key + ".js";
    w.el = document.createElement("script");
    w.el.src = src;
    w.el.onerror = function () {
      RPT.waiting.delete(key);
      w.el.remove();
      w.reject(new Error("could not load " + src + ": keep the folder " + RPT.D.dir + "/ beside the page"));
    };
    RPT.waiting.set(key, w);
    document.head.appendChild(w.el);
    return w.promise;
  };

  // run fn once every block of `keys` is loaded: at once when they are, else after loading them
  RPT.need = function (keys, fn) {
    for (const k of keys) RPT.pinned.set(k, (RPT.pinned.get(k) || 0) + 1);
    const unpin = function () {
      for (const k of keys) { const n = RPT.pinned.get(k) - 1; if (n > 0) RPT.pinned.set(k, n); else RPT.pinned.delete(k); }
    };
    const missing = keys.filter((k) => !RPT.cache.has(k));
    if (!missing.length) { try { fn(); } finally { unpin(); } return; }
    RPT.pending += 1;
    RPT.updateStatus();
    Promise.all(missing.map(RPT.load)).then(function () { fn(); }).catch(function (err) {
      RPT.errors.push(String(err && err.message ? err.message : err));
      RPT.loadError = String(err && err.message ? err.message : err);
    }).finally(function () {
      unpin();
      RPT.pending -= 1;
      RPT.updateStatus();
      if (RPT.pending === 0) { const q = RPT.idleQueue || []; RPT.idleQueue = []; for (const f of q) f(); }
    });
  };

  RPT.whenIdle = function (fn) {
    if (RPT.pending === 0) fn(); else (RPT.idleQueue = RPT.idleQueue || []).push(fn);
  };

  RPT.chunkOf = function (t) { return Math.floor(t / RPT.D.chunk); };

  RPT.frameKeys = function (t, cube) {
    const c = RPT.chunkOf(t);
    return RPT.D.group_size.map((_, g) => RPT.cubeKey(cube, g, c));
  };

  // blocks of every time chunk of the pixel groups of `indices`
  RPT.seriesKeys = function (indices, cube) {
    const grp = RPT.m.pixels.data.group, gs = new Set(), keys = [];
    for (const p of indices) gs.add(grp[p]);
    for (const g of gs) for (let c = 0; c < RPT.D.n_chunks; c++) keys.push(RPT.cubeKey(cube, g, c));
    return keys;
  };

  // block and file names, as workflow_lib/report/datafiles.py writes them (cube_key, set_key)
  RPT.cubeKey = function (cube, g, c) { return cube + "_g" + g + "_c" + c; };
  RPT.fileKey = function (set, k) { return "lc_" + set + "_s" + k; };
  RPT.setKey = function (set, s) { return RPT.fileKey(set, Math.floor(s / RPT.D.per_file)); };

  RPT.sourceKeys = function (s) {
    return s == null || s < 0 ? [] : RPT.D.sets.map((set) => RPT.setKey(set, s));
  };

  // one frame of a cube (its blocks loaded)
  RPT.frame = function (t, cube) {
    const D = RPT.D, c = RPT.chunkOf(t), k = t - c * D.chunk, n = Math.min(D.chunk, RPT.nt - c * D.chunk);
    const blocks = D.group_size.map((_, g) => RPT.get(RPT.cubeKey(cube || RPT.cube, g, c)));
    const grp = RPT.m.pixels.data.group, slot = RPT.m.pixels.data.slot, out = new Float32Array(RPT.np);
    for (let p = 0; p < RPT.np; p++) out[p] = blocks[grp[p]][slot[p] * n + k];
    return out;
  };

  // Sum of the selected pixels' series (NaN-skipping; NaN where every selected pixel is NaN); `squares`: the sum
  // of squares (for flux_err). The blocks of seriesKeys(indices, cube) must be loaded.
  RPT.pixelSum = function (indices, cube, squares) {
    const D = RPT.D, nt = RPT.nt, out = new Float64Array(nt), cnt = new Int32Array(nt);
    const grp = RPT.m.pixels.data.group, slot = RPT.m.pixels.data.slot;
    const idx = Array.from(indices).sort((a, b) => a - b);
    cube = cube || RPT.cube;
    for (let c = 0; c < D.n_chunks; c++) {
      const t0 = c * D.chunk, n = Math.min(D.chunk, nt - t0);
      for (const p of idx) {
        const b = RPT.get(RPT.cubeKey(cube, grp[p], c)), o = slot[p] * n;
        for (let k = 0; k < n; k++) {
          const v = b[o + k];
          if (v === v) { out[t0 + k] += squares ? v * v : v; cnt[t0 + k] += 1; }
        }
      }
    }
    for (let t = 0; t < nt; t++) if (cnt[t] === 0) out[t] = NaN;
    return out;
  };

  // flux (or, with err, flux_err) of source s in a light-curve set; null when the page has no such set
  RPT.sourceSeries = function (set, s, err) {
    const D = RPT.D;
    if (s == null || s < 0 || D.sets.indexOf(set) < 0) return null;
    const arr = RPT.get(RPT.setKey(set, s));
    if (!arr) return null;
    const k = Math.floor(s / D.per_file), n = Math.min(D.per_file, RPT.meta.n_sources - k * D.per_file);
    const nt = RPT.nt, out = new Float64Array(nt), o = ((err ? n : 0) + (s - k * D.per_file)) * nt;
    for (let t = 0; t < nt; t++) out[t] = arr[o + t];
    return out;
  };

  RPT.nanArray = function () { return new Float64Array(RPT.nt).fill(NaN); };

  // ---------------------------------------------------------------- what is shown

  RPT.lcMode = function () { return ["pixels", "lfd", "cpm"][RPT.m.lc_mode.active]; };

  // keys the light curve shown needs
  RPT.lcKeys = function () {
    const mode = RPT.lcMode();
    if (mode === "pixels") return RPT.seriesKeys(RPT.m.pixels.selected.indices, RPT.cube);
    return RPT.src == null || RPT.D.sets.indexOf(mode) < 0 ? [] : [RPT.setKey(mode, RPT.src)];
  };

  RPT.currentLc = function () {
    const mode = RPT.lcMode();
    if (mode === "pixels") return { mode: mode, flux: RPT.pixelSum(RPT.m.pixels.selected.indices, RPT.cube) };
    const s = RPT.sourceSeries(mode, RPT.src);
    return { mode: mode, flux: s ? s : RPT.nanArray() };
  };

  // why the light curve shown is empty ("" when it is not)
  RPT.lcEmptyReason = function (mode) {
    if (mode === "pixels") return RPT.m.pixels.selected.indices.length ? "" : "no pixel selected: tap a pixel or drag a box";
    if (RPT.src == null) return "no source selected: tap a source (switch the tap mode) or a table row";
    return RPT.sourceEmptyReason(mode === "lfd" ? "lfd" : "cpm", RPT.src);
  };

  // why source s has no light curve in a set ("" when it has one)
  RPT.sourceEmptyReason = function (set, s) {
    const d = RPT.m.sources.data, label = SET_LABELS[set] || set;
    if (RPT.D.sets.indexOf(set) < 0) return "no " + label + " light curves: that stage was not run or is stale (see the notes above)";
    const has = d["has_" + set];
    if (has && has[s]) return "";
    if (d.on_cutout && !d.on_cutout[s]) return "no " + label + " light curve: the source is off the pixels";
    const f = d.lfd_flag ? d.lfd_flag[s] | 0 : 0;
    if (f) return "no " + label + " light curve: " + RPT.flagText(f);
    return "no " + label + " light curve for this source";
  };

  RPT.flagText = function (f) {
    const out = [];
    if (f & 1) out.push("not in the LFD model (too little of its light on the pixels)");
    if (f & 2) out.push("off the pixels");
    if (f & 4) out.push("LFD flux <= 0");
    return out.join(", ");
  };

  RPT.updateLc = function () {
    const gen = (RPT.lcGen = (RPT.lcGen || 0) + 1), cube = RPT.cube;
    RPT.need(RPT.lcKeys(), function () {
      if (gen !== RPT.lcGen) return; // a newer selection took over
      const lc = RPT.currentLc();
      RPT.lcFlux = lc.flux;
      setColumns(RPT.m.lc, { flux: lc.flux });
      const why = RPT.lcEmptyReason(lc.mode);
      const title = why ? "light curve: " + why : {
        pixels: "light curve: aperture sum of the selected pixels" + (cube === "cpm" ? " (CPM de-trended cube)" : "") + " [e-/s]",
        lfd: "light curve: LFD flux of the selected source [e-/s]",
        cpm: "light curve: CPM flux of the selected source [e-/s]" }[lc.mode];
      if (RPT.m.lc_fig && RPT.m.lc_fig.title) RPT.m.lc_fig.title.text = title;
      if (RPT.D.sets.indexOf("raw") < 0 && lc.mode === "pixels") setColumns(RPT.m.srclc, { raw: lc.flux });
      RPT.updateStatus();
    });
    if (RPT.D.sets.indexOf("raw") < 0 && RPT.lcMode() !== "pixels") {
      const sel = RPT.m.pixels.selected.indices;
      RPT.need(RPT.seriesKeys(sel, RPT.cube), function () {
        if (gen === RPT.lcGen) setColumns(RPT.m.srclc, { raw: RPT.pixelSum(sel, cube) });
      });
    }
  };

  RPT.onCadence = function () {
    const m = RPT.m, t = m.cadence_slider.value | 0, cube = RPT.cube;
    RPT.t = t;
    const time = m.lc.data.time[t];
    for (const n of ["span_main", "span_raw", "span_lfd", "span_cpm", "span_dbl"]) if (m[n]) m[n].location = time;
    RPT.need(RPT.frameKeys(t, cube), function () {
      if (RPT.t !== t || RPT.cube !== cube) return; // the slider moved on meanwhile
      setColumns(m.pixels, { flux: RPT.frame(t, cube) });
      if (m.auto_stretch && m.auto_stretch.active) RPT.autoStretch();
      RPT.updateStatus();
    });
    // playing or stepping towards the next time chunk: fetch it ahead
    const c = RPT.chunkOf(t);
    if (c + 1 < RPT.D.n_chunks && t + 32 >= (c + 1) * RPT.D.chunk) for (const k of RPT.frameKeys((c + 1) * RPT.D.chunk, cube)) RPT.load(k).catch(function () {});
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
    const a = RPT.toSlider(lo), b = RPT.toSlider(hi);
    if (a < s.start) s.start = a;
    if (b > s.end) s.end = b;
    s.value = [a, b];
  };

  // The stretch slider works in log10(flux) with the log stretch (its labels show e-/s) and in flux with the
  // linear one; its range is the 0.2-99.8 % percentiles of the cube shown (meta.stretch).
  RPT.isLog = function () { return RPT.m.stretch_mode.active === 0; };
  RPT.toSlider = function (v) {
    return RPT.isLog() ? Math.log10(Math.max(v, RPT.meta.stretch[RPT.cube].pos)) : v;
  };
  RPT.fromSlider = function (v) { return RPT.isLog() ? Math.pow(10, v) : v; };
  RPT.stretchLimits = function () {
    const v = RPT.m.stretch_slider.value;
    return [RPT.fromSlider(v[0]), RPT.fromSlider(v[1])];
  };
  RPT.setStretch = function (lo, hi) { // the slider's range for the cube and mode shown, and its limits
    const s = RPT.m.stretch_slider, st = RPT.meta.stretch[RPT.cube];
    const a = RPT.toSlider(Math.min(st.vlo, lo)), b = RPT.toSlider(Math.max(st.vhi, hi));
    s.start = a; s.end = b > a ? b : a + 1e-6; s.step = (s.end - s.start) / 500;
    s.value = [RPT.toSlider(lo), RPT.toSlider(hi)];
    RPT.onStretch();
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
    const src = (RPT.src = sel.length ? sel[0] : null);
    const gen = (RPT.srcGen = (RPT.srcGen || 0) + 1);
    if (m.source_title) {
      if (src == null) m.source_title.text = "<b>Selected source</b>: none (tap a source or a table row)";
      else {
        const d = m.sources.data, i = src;
        const g = d.gmag[i], c = d.contamination[i], ra = d.ra ? d.ra[i] : NaN, dec = d.dec ? d.dec[i] : NaN;
        m.source_title.text = "<b>Gaia DR3 " + d.source_id[i] + "</b> G=" + (g === g ? g.toFixed(2) : "?") +
          " at column " + d.column[i].toFixed(2) + ", row " + d.row[i].toFixed(2) +
          (ra === ra ? " (RA " + ra.toFixed(5) + "°, Dec " + dec.toFixed(5) + "°)" : "") +
          (c === c ? ", contamination " + RPT.contaminationText(c) : "") +
          (d.on_cutout && !d.on_cutout[i] ? " &middot; <b>off the pixels</b>" : "");
      }
    }
    RPT.need(RPT.sourceKeys(src), function () {
      if (gen !== RPT.srcGen) return;
      const cols = {};
      for (const k of ["raw", "lfd", "cpm", "dbl"]) {
        const s = RPT.sourceSeries(k, src);
        if (s) cols[k] = s;
        else if (k !== "raw") cols[k] = RPT.nanArray();
        const f = m["srcfig_" + k];
        if (f && f.title && !(k === "raw" && RPT.D.sets.indexOf("raw") < 0)) {
          const why = src == null ? "no source selected" : RPT.sourceEmptyReason(k, src);
          f.title.text = RPT.setTitles[k] + (why ? " — " + why : "");
        }
      }
      setColumns(m.srclc, cols);
    });
    if (RPT.D.sets.indexOf("raw") < 0 || (m.lc_mode && m.lc_mode.active !== 0)) RPT.updateLc();
    RPT.updateStatus();
    // chosen in the table (a row or an id link) or by the URL: bring the source's panels into view
    if (RPT.ready && src != null && !RPT.fromImage && m.source_title) RPT.scrollToSource();
  };

  RPT.scrollToSource = function () {
    const v = Bokeh.index.get_one ? Bokeh.index.get_one(RPT.m.source_title) : null;
    if (v && v.el && v.el.scrollIntoView) { v.el.scrollIntoView({ block: "start" }); RPT.scrolled = (RPT.scrolled || 0) + 1; }
  };

  // contamination: the fraction of the flux in the source's LFD pixels that the model gives to other sources
  RPT.contaminationText = function (c) {
    return c > 10 ? "> 10 (neighbours outshine it)" : c.toFixed(3);
  };

  RPT.selectSourceId = function (id) {
    const ids = RPT.m.sources ? RPT.m.sources.data.source_id : [];
    const i = Array.prototype.indexOf.call(ids, String(id));
    if (i >= 0) RPT.m.sources.selected.indices = [i];
    return i;
  };

  RPT.updateStatus = function () {
    const m = RPT.m;
    if (!m || !m.status) return;
    const t = RPT.t | 0, d = m.lc.data;
    const nsel = m.pixels.selected.indices.length;
    const f = RPT.lcFlux ? RPT.lcFlux[t] : NaN;
    const what = { pixels: "aperture sum", lfd: "LFD flux", cpm: "CPM flux" }[RPT.lcMode()];
    m.status.text = "cadence index <b>" + t + "</b> (cadenceno " + d.cadenceno[t] + "), time " +
      d.time[t].toFixed(5) + " " + RPT.meta.time_system + ", " + what + " " + (f === f ? f.toFixed(2) + " e-/s" : "— (none)") +
      " &middot; image: " + (RPT.cube === "cpm" ? "CPM de-trended" : "raw") +
      " &middot; <span id='rpt-npix'>" + nsel + "</span> pixel(s) selected" +
      (RPT.meta.bin_factor > 1 ? " &middot; display bins of " + RPT.meta.bin_factor + " cadences" : "") +
      (RPT.pending > 0 ? " &middot; <i>loading data…</i>" : "") +
      (RPT.loadError ? " &middot; <b style='color:#b00'>" + RPT.loadError + "</b>" : "");
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
      if (best >= 0) {
        RPT.fromImage = true; // picked on the image: the page stays where it is
        try { m.sources.selected.indices = [best]; } finally { RPT.fromImage = false; }
      }
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
    RPT.cube = m.image_mode.active === 1 && RPT.D.cubes.indexOf("cpm") >= 0 ? "cpm" : "raw";
    const st = RPT.meta.stretch[RPT.cube];
    RPT.switching = true; // the mode switch below must not carry the other cube's limits over
    try { m.stretch_mode.active = RPT.cube === "cpm" ? 1 : 0; } finally { RPT.switching = false; }
    RPT.applyMapper();
    RPT.setStretch(st.lo, st.hi);
    RPT.onCadence();
    RPT.updateLc();
  };

  RPT.onStretch = function () {
    const m = RPT.m, st = RPT.meta.stretch[RPT.cube], v = RPT.stretchLimits();
    const lo = Math.max(v[0], st.pos);
    m.mapper_log.low = lo;
    m.mapper_log.high = Math.max(v[1], lo * 1.0001);
    m.mapper_lin.low = v[0];
    m.mapper_lin.high = v[1];
    RPT.limits = v;
  };

  RPT.applyMapper = function () {
    const m = RPT.m, r = m.pixel_renderer;
    const mapper = RPT.isLog() ? m.mapper_log : m.mapper_lin;
    const spec = { field: "flux", transform: mapper };
    for (const g of [r.glyph, r.selection_glyph, r.nonselection_glyph]) if (g) g.fill_color = spec;
    for (const g of [r.glyph, r.nonselection_glyph]) if (g) g.line_color = spec; // the seam-hiding outline
    if (m.colorbar) m.colorbar.color_mapper = mapper;
    m.stretch_slider.title = RPT.isLog() ? "screen stretch [e-/s], log scale" : "screen stretch [e-/s]";
  };

  RPT.onStretchMode = function () {
    if (RPT.switching) return;
    const lim = RPT.limits || [RPT.meta.stretch[RPT.cube].lo, RPT.meta.stretch[RPT.cube].hi];
    RPT.applyMapper();
    RPT.setStretch(lim[0], lim[1]); // the same limits on the new scale
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

  // the selection as a FITS image: an int16 0/1 APERTURE extension on the page's pixel grid (rows x columns),
  // with the cutout's WCS shifted to the grid and the physical CCD-pixel WCS (fits.js)
  RPT.maskFits = function () {
    const meta = RPT.meta, rows = meta.grid_rows, cols = meta.grid_cols, nr = rows.length, nc = cols.length;
    const mask = new Uint8Array(nr * nc), d = RPT.m.pixels.data;
    const sel = RPT.m.pixels.selected.indices;
    for (const p of sel) mask[rows.indexOf(d.row[p]) * nc + cols.indexOf(d.column[p])] = 1;
    return RPTFITS.apertureMask({ mask: mask, nrows: nr, ncols: nc, wcsCards: meta.wcs_cards || [],
      extraCards: [["FIELD", String(meta.field), "field of the report page"], ["MISSION", String(meta.mission), ""],
        ["NPIXSEL", sel.length, "pixels selected"]] });
  };

  RPT.exportMaskFits = function () {
    RPT.download(RPT.meta.field + "_mask.fits", RPT.maskFits(), "application/fits");
  };

  RPT.lcFits = function (lc) {
    const d = RPT.m.lc.data, meta = RPT.meta;
    return RPTFITS.lightcurve({ mission: meta.mission, sourceId: lc.sourceId, object: meta.field + " " + lc.what,
      method: lc.mode === "pixels" ? "APERTURE" : lc.mode.toUpperCase(), timeSystem: meta.time_system,
      timeOffset: meta.time_offset, time: Float64Array.from(d.time), cadenceno: Int32Array.from(d.cadenceno),
      flux: Float32Array.from(lc.flux), flux_err: Float32Array.from(lc.err), quality: Int32Array.from(d.quality),
      extraCards: [["FIELD", String(meta.field), "field of the report page"], ["BINFACT", meta.bin_factor, "cadences per display bin"]] });
  };

  RPT.exportLcFits = function () {
    RPT.withErrors(function (lc) { RPT.download(RPT.meta.field + "_lightcurve.fits", RPT.lcFits(lc), "application/fits"); });
  };

  RPT.exportMask = function () {
    RPT.download(RPT.meta.field + "_mask.json", JSON.stringify(RPT.maskObject(), null, 1), "application/json");
  };

  // the light curve shown with its 1-sigma errors: for pixels the root sum of squares of the pixels' flux_err
  // (also for the CPM de-trended cube: the CPM prediction's own error is not included); then fn(lc)
  RPT.withErrors = function (fn) {
    const mode = RPT.lcMode(), sel = Array.from(RPT.m.pixels.selected.indices), cube = RPT.cube, src = RPT.src;
    const keys = mode === "pixels" ? RPT.seriesKeys(sel, cube).concat(RPT.seriesKeys(sel, "err")) : RPT.lcKeys();
    RPT.need(keys, function () {
      let flux, err;
      if (mode === "pixels") {
        flux = RPT.pixelSum(sel, cube);
        err = RPT.pixelSum(sel, "err", true).map(Math.sqrt);
      } else {
        flux = RPT.sourceSeries(mode, src) || RPT.nanArray();
        err = RPT.sourceSeries(mode, src, true) || RPT.nanArray();
      }
      const sid = src != null ? RPT.m.sources.data.source_id[src] : null;
      const what = mode === "pixels" ? "aperture sum of " + sel.length + " pixels of the " +
        (cube === "cpm" ? "CPM de-trended" : "raw") + " cube" : (mode === "lfd" ? "LFD" : "CPM") + " light curve of Gaia DR3 " + sid;
      fn({ mode: mode, flux: flux, err: err, sourceId: mode === "pixels" ? null : sid, what: what });
    });
  };

  RPT.lcCsv = function (lc) {
    const d = RPT.m.lc.data;
    const lines = ["# field " + RPT.meta.field + "; " + lc.what +
      "; time " + RPT.meta.time_system + " [d]; flux and flux_err [e-/s]" +
      (lc.mode === "pixels" ? "; flux_err: root sum of squares of the pixels' flux_err" : "") +
      (RPT.meta.bin_factor > 1 ? "; bins of " + RPT.meta.bin_factor + " cadences (cadenceno: the first of each bin)" : ""),
      "time,flux,flux_err,quality,cadenceno"];
    for (let t = 0; t < RPT.nt; t++) {
      const f = lc.flux[t], e = lc.err[t];
      lines.push(d.time[t] + "," + (f === f ? f : "nan") + "," + (e === e ? e : "nan") + "," + d.quality[t] + "," + d.cadenceno[t]);
    }
    return lines.join("\n") + "\n";
  };

  RPT.exportLc = function () {
    RPT.withErrors(function (lc) { RPT.download(RPT.meta.field + "_lightcurve.csv", RPT.lcCsv(lc), "text/csv"); });
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
