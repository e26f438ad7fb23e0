// A small dependency-free FITS writer for the offline report pages (export from the browser).
// Everything is built in memory as Uint8Array: header blocks of 80-character ASCII cards padded to 2880
// bytes, data big-endian (FITS order) padded with zeros to 2880 bytes. Layouts follow the pipeline's own
// writers (workflow_lib/data/lightcurves.py::lightcurve_hdulist) so astropy and lightkurve read them alike.
//
// Header values: true/false -> logical, safe integers and BigInt -> integer, other numbers -> real,
// strings -> quoted string, null -> undefined value. An integral number that must be written as a real
// (e.g. 2457000.0) is wrapped: RPTFITS.real(2457000). Gaia DR3 ids exceed 2^53: pass them as strings or BigInt.
(function () {
  "use strict";
  const F = (window.RPTFITS = window.RPTFITS || {});
  const BLOCK = 2880;
  const KEY_RE = /^[A-Z0-9_-]{1,8}$/;
  const TEXT_KEYS = new Set(["COMMENT", "HISTORY", ""]);

  // Only printable ASCII is allowed in a header; anything else becomes '?'.
  const ascii = (s) => String(s).replace(/[^\x20-\x7e]/g, "?");

  F.real = (v) => ({ real: Number(v) });

  // A real as the shortest string that round-trips (JS String() does that), always with '.' or 'E'.
  function fmtReal(v) {
    if (!Number.isFinite(v)) throw new Error("FITS header values must be finite, got " + v);
    let s = String(v).toUpperCase();
    if (s.includes("E")) {
      if (!s.split("E")[0].includes(".")) s = s.replace("E", ".0E");
    } else if (!s.includes(".")) s += ".0";
    return s;
  }

  // The value field (from column 11): numbers and logicals right-justified to column 30, strings quoted.
  function fmtValue(v) {
    if (v === null || v === undefined) return "".padStart(20);
    if (typeof v === "boolean") return (v ? "T" : "F").padStart(20);
    if (typeof v === "bigint") return v.toString().padStart(20);
    if (typeof v === "object" && "real" in v) return fmtReal(v.real).padStart(20);
    if (typeof v === "number") return (Number.isSafeInteger(v) ? String(v) : fmtReal(v)).padStart(20);
    if (typeof v === "string") {
      const q = "'" + ascii(v).replace(/'/g, "''").padEnd(8) + "'";
      if (q.length > 70) throw new Error("FITS string value too long (max 68 characters): " + v);
      return q.padEnd(20);
    }
    throw new Error("unsupported FITS header value: " + v);
  }

  // One 80-character card. COMMENT / HISTORY / blank keys take free text instead of a value.
  F.card = function (key, value, comment) {
    const k = String(key).toUpperCase();
    if (!TEXT_KEYS.has(k) && !KEY_RE.test(k)) throw new Error("invalid FITS keyword: '" + key + "'");
    if (TEXT_KEYS.has(k)) return (k.padEnd(8) + ascii(value === undefined || value === null ? "" : value))
      .slice(0, 80).padEnd(80);
    let c = k.padEnd(8) + "= " + fmtValue(value);
    if (c.length > 80) throw new Error("FITS card too long for keyword " + k);
    if (comment) c += " / " + ascii(comment);
    return c.slice(0, 80).padEnd(80);
  };

  // Cards ([key, value, comment] arrays or ready card strings) + END, padded with spaces to 2880 bytes.
  F.header = function (cards) {
    let s = cards.map((c) => (typeof c === "string" ? c.padEnd(80).slice(0, 80) : F.card(c[0], c[1], c[2]))).join("");
    s += "END".padEnd(80);
    s = s.padEnd(Math.ceil(s.length / BLOCK) * BLOCK);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  };

  // Header bytes followed by `nbytes` of data, the data written by fill(DataView at the data start).
  function hdu(cards, nbytes, fill) {
    const head = F.header(cards);
    const out = new Uint8Array(head.length + Math.ceil(nbytes / BLOCK) * BLOCK);
    out.set(head, 0);
    if (nbytes) fill(new DataView(out.buffer, head.length, nbytes));
    return out;
  }

  // Big-endian setters by BITPIX / TFORM, with the element size in bytes.
  const PUT = {
    8: [1, (dv, o, v) => dv.setUint8(o, v)],
    16: [2, (dv, o, v) => dv.setInt16(o, v, false)],
    32: [4, (dv, o, v) => dv.setInt32(o, v, false)],
    "-32": [4, (dv, o, v) => dv.setFloat32(o, v, false)],
    "-64": [8, (dv, o, v) => dv.setFloat64(o, v, false)],
  };
  const TFORM = { B: PUT[8], I: PUT[16], J: PUT[32], E: PUT[-32], D: PUT[-64],
    K: [8, (dv, o, v) => dv.setBigInt64(o, BigInt(v), false)] };

  // An image HDU: data row-major (data[r * ncols + c]) of shape [nrows, ncols]; NAXIS1 = ncols.
  F.imageHDU = function (o) {
    const bitpix = o.bitpix === undefined ? -32 : o.bitpix;
    if (!PUT[bitpix]) throw new Error("unsupported BITPIX " + bitpix);
    const shape = o.data ? o.shape : [];
    const n = shape.reduce((a, b) => a * b, shape.length ? 1 : 0);
    if (o.data && o.data.length !== n) throw new Error("image data length " + o.data.length + " != " + shape.join("x"));
    const cards = o.primary ? [["SIMPLE", true, "conforms to FITS standard"]]
      : [["XTENSION", "IMAGE", "image extension"]];
    cards.push(["BITPIX", bitpix, "array data type"], ["NAXIS", shape.length, "number of array dimensions"]);
    // FITS lists the fastest-varying axis first: NAXIS1 = columns, NAXIS2 = rows.
    shape.slice().reverse().forEach((len, i) => cards.push(["NAXIS" + (i + 1), len, ""]));
    if (o.primary) cards.push(["EXTEND", true, "may contain extensions"]);
    else cards.push(["PCOUNT", 0, "number of group parameters"], ["GCOUNT", 1, "number of groups"]);
    if (o.extname) cards.push(["EXTNAME", o.extname, "extension name"]);
    cards.push(...(o.cards || []));
    const [size, put] = PUT[bitpix];
    return hdu(cards, n * size, (dv) => {
      for (let i = 0; i < n; i++) put(dv, i * size, Number(o.data[i]));
    });
  };

  // A binary table: columns [{name, format: D|E|J|K|I|B, unit, data}], all of the same length.
  F.binTableHDU = function (o) {
    const cols = o.columns || [];
    const nrows = cols.length ? cols[0].data.length : 0;
    let rowBytes = 0;
    const offs = cols.map((c) => {
      if (!TFORM[c.format]) throw new Error("unsupported TFORM " + c.format + " for column " + c.name);
      if (c.data.length !== nrows) throw new Error("column " + c.name + ": " + c.data.length + " rows, not " + nrows);
      rowBytes += TFORM[c.format][0];
      return rowBytes - TFORM[c.format][0];
    });
    const cards = [["XTENSION", "BINTABLE", "binary table extension"], ["BITPIX", 8, "array data type"],
      ["NAXIS", 2, "number of array dimensions"], ["NAXIS1", rowBytes, "length of a row in bytes"],
      ["NAXIS2", nrows, "number of rows"], ["PCOUNT", 0, "size of special data area"],
      ["GCOUNT", 1, "one data group"], ["TFIELDS", cols.length, "number of table fields"]];
    cols.forEach((c, i) => {
      cards.push(["TTYPE" + (i + 1), c.name, ""], ["TFORM" + (i + 1), c.format, ""]);
      if (c.unit) cards.push(["TUNIT" + (i + 1), c.unit, ""]);
    });
    if (o.extname) cards.push(["EXTNAME", o.extname, "extension name"]);
    cards.push(...(o.cards || []));
    return hdu(cards, rowBytes * nrows, (dv) => {
      cols.forEach((c, j) => {
        const [, put] = TFORM[c.format];
        const num = c.format !== "K";
        for (let r = 0; r < nrows; r++) put(dv, r * rowBytes + offs[j], num ? Number(c.data[r]) : c.data[r]);
      });
    });
  };

  const emptyPrimary = (cards) => F.imageHDU({ primary: true, bitpix: 8, cards: cards || [] });

  // One file from HDUs (Uint8Arrays); the first must be a primary HDU (SIMPLE), none gives an empty primary.
  F.file = function (hdus) {
    const list = hdus && hdus.length ? hdus : [emptyPrimary()];
    if (String.fromCharCode(...list[0].subarray(0, 8)) !== "SIMPLE  ") throw new Error("the first HDU must be primary");
    const out = new Uint8Array(list.reduce((a, h) => a + h.length, 0));
    let at = 0;
    for (const h of list) { out.set(h, at); at += h.length; }
    return out;
  };

  const KEPLER = (m) => m === "Kepler" || m === "K2";

  // A light-curve file laid out like the pipeline's (lightkurve-readable): primary + LIGHTCURVE table.
  F.lightcurve = function (o) {
    const mission = o.mission || "TESS";
    const time = o.time, n = time.length;
    const tsys = o.timeSystem || (KEPLER(mission) ? "BKJD" : "BTJD");
    const offset = o.timeOffset !== undefined ? Number(o.timeOffset) : KEPLER(mission) ? 2454833.0 : 2457000.0;
    const hasId = o.sourceId !== null && o.sourceId !== undefined;
    const object = hasId ? "Gaia DR3 " + String(o.sourceId) : String(o.object || "");
    const prim = [["TELESCOP", KEPLER(mission) ? "Kepler" : mission, "telescope"], ["MISSION", mission, "mission"],
      ["INSTRUME", mission === "TESS" ? "TESS Photometer" : "Kepler Photometer", ""],
      ["OBJECT", object, hasId ? "Gaia DR3 source_id of the target" : "target"]];
    if (hasId && /^\d+$/.test(String(o.sourceId))) {
      prim.push(["GAIAID", BigInt(String(o.sourceId)), "Gaia DR3 source_id"]);
    }
    prim.push(["METHOD", o.method || "", "photometry method (LFD, CPM, RAW)"], ...(o.extraCards || []));
    const fill = (a, v) => a || Array.from({ length: n }, (_, i) => (v === undefined ? i : v));
    let tmin = Infinity, tmax = -Infinity; // no Math.max(...time): long arrays overflow the call stack
    for (const t of time) if (Number.isFinite(t)) { tmin = Math.min(tmin, t); tmax = Math.max(tmax, t); }
    const telapse = tmax >= tmin ? tmax - tmin : 0;
    const table = F.binTableHDU({
      extname: "LIGHTCURVE",
      columns: [
        { name: "TIME", format: "D", unit: tsys, data: time },
        { name: "CADENCENO", format: "J", data: fill(o.cadenceno) },
        { name: "FLUX", format: "E", unit: "e-/s", data: o.flux },
        { name: "FLUX_ERR", format: "E", unit: "e-/s", data: fill(o.flux_err, NaN) },
        { name: "QUALITY", format: "J", data: fill(o.quality, 0) },
      ],
      cards: [["TIMEREF", "SOLARSYSTEM", "barycentric correction applied to times"],
        ["TIMESYS", "TDB", "time system is Barycentric Dynamical Time"],
        ["BJDREFI", Math.trunc(offset), "integer part of BJD reference date"],
        ["BJDREFF", F.real(offset - Math.trunc(offset)), "fraction of day in BJD reference date"],
        ["TIMEUNIT", "d", "time unit for TIME"], ["TELAPSE", F.real(telapse), ""],
        ["OBJECT", object, hasId ? "Gaia DR3 source_id of the target" : "target"]],
    });
    return F.file([emptyPrimary(prim), table]);
  };

  // An aperture mask (row-major, nrows x ncols) as int16 0/1 in IMAGE extension 'APERTURE' carrying the
  // WCS cards (so astropy.wcs.WCS(hdu.header) works); extraCards go to the primary header.
  F.apertureMask = function (o) {
    const data = Int16Array.from(o.mask, (v) => (v ? 1 : 0));
    const img = F.imageHDU({ data: data, shape: [o.nrows, o.ncols], bitpix: 16, extname: "APERTURE",
      cards: o.wcsCards || [] });
    return F.file([emptyPrimary(o.extraCards), img]);
  };
})();
