"""The tiny run's fingerprint manifest (tests/helpers/manifest.py): blind to round-off, not to changes."""

import base64
import gzip
import json

import numpy as np
import pytest
from helpers.manifest import array_digest, compare, data_file_digest, dumps, page_digest

RNG = np.random.default_rng(5)


@pytest.fixture
def field():
    a = RNG.normal(1000.0, 30.0, size=(40, 500))
    a[3, 7] = np.nan
    return a


def test_round_off_agrees(field):
    # the size of the differences two CPUs' OpenBLAS kernels give (measured: <= 2e-9 of an array's scale)
    noisy = field * (1 + 2e-9 * RNG.standard_normal(field.shape))
    coherent = field * (1 + 1e-10)
    assert array_digest(noisy) != array_digest(field)  # not bitwise equal...
    assert not compare({"a": array_digest(noisy)}, {"a": array_digest(field)})  # ...but agrees
    assert not compare({"a": array_digest(coherent)}, {"a": array_digest(field)})
    assert not compare({"a": array_digest(field.astype(np.float32))}, {"a": array_digest(field.astype(np.float32))})


@pytest.mark.parametrize(
    "change",
    [
        lambda a: a * (1 + 1e-5),  # every value 10 ppm
        lambda a: np.where(np.arange(a.size).reshape(a.shape) == 1234, a * 1.02, a),  # one value 2 %
        lambda a: np.where(np.arange(a.size).reshape(a.shape) == 99, np.nan, a),  # a new NaN
        lambda a: a[:, ::-1],  # the same values in another order (blocks)
        lambda a: a.astype(np.float32),  # dtype
    ],
)
def test_a_change_is_found(field, change):
    assert compare({"a": array_digest(change(field))}, {"a": array_digest(field)}) == ["changed: a"]


def test_integers_and_text_are_exact():
    q = np.arange(100, dtype=np.int32)
    q2 = q.copy()
    q2[50] += 1
    assert compare({"q": array_digest(q2)}, {"q": array_digest(q)}) == ["changed: q"]
    labels = np.array(["G=12.5 e-/s", "edge"])
    assert compare({"s": array_digest(np.array(["G=12.6 e-/s", "edge"]))}, {"s": array_digest(labels)})
    assert compare({"s": array_digest(np.array(["G=12.5 e-/s", "Edge"]))}, {"s": array_digest(labels)})


def _page(tmp_path, values, title="flux"):
    """The manifest entries of a page embedding ``values`` as a Bokeh ndarray and of its float32 data file."""
    raw = gzip.compress(np.asarray(values, "<f8").tobytes(), mtime=0)
    blob = json.dumps(
        {
            "type": "ndarray",
            "array": {"type": "bytes", "data": base64.b64encode(raw).decode()},
            "shape": [len(values)],
            "dtype": "float64",
            "order": "little",
        },
        separators=(",", ":"),
    )
    chunk = base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()
    stem = tmp_path / f"page{RNG.integers(1e9)}"
    stem.with_suffix(".html").write_text(f"<h1>{title}</h1><script>x={blob}; y=0.5;</script>")
    stem.with_suffix(".js").write_text(f'RPT.chunk("lc_s0", "{chunk}");\n')
    return {"p": page_digest(stem.with_suffix(".html")), "d": data_file_digest(stem.with_suffix(".js"))}


def test_pages_round_off_and_changes(tmp_path):
    v = RNG.normal(500.0, 5.0, 300)
    ref = _page(tmp_path, v)
    assert len([k for e in ref.values() for k in e if k.startswith("array")]) == 2  # the Bokeh array, the chunk
    assert not compare(_page(tmp_path, v * (1 + 1e-12)), ref)
    assert compare(_page(tmp_path, v * 1.001), ref) == ["changed: d", "changed: p"]
    assert compare(_page(tmp_path, v, title="Flux"), ref) == ["changed: p"]


def test_dumps_is_json_one_product_per_line(field):
    m = {"b": array_digest(field), "a": "0" * 64}
    text = dumps(m)
    assert json.loads(text) == json.loads(json.dumps(m))
    assert text.count("\n") == 4 and text.index('"a"') < text.index('"b"')
