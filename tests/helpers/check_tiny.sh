#!/usr/bin/env bash
# Run the tiny config end to end in a scratch dir and compare its products with tests/data/tiny_manifest.json.
# Usage: bash tests/helpers/check_tiny.sh   (prints "MANIFEST OK" or the differences; the run dir is printed)
set -uo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
d="$(mktemp -d /tmp/tiny.XXXX)"
cp -r "$repo/.test/config" "$d/"
start=$(date +%s)
if ! python -m snakemake -s "$repo/Snakefile" --directory "$d" --cores 2 > "$d/snakemake.log" 2>&1; then
  echo "RUN FAILED: see $d/snakemake.log"; tail -30 "$d/snakemake.log"; exit 1
fi
echo "run took $(( $(date +%s) - start )) s in $d"
cd "$repo" && python -W ignore - "$d" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from helpers.manifest import compare, manifest
found = manifest(Path(sys.argv[1]) / "results" / "ci-tiny")
diffs = compare(found, json.loads(Path("tests/data/tiny_manifest.json").read_text()))
print("MANIFEST OK" if not diffs else "MANIFEST DIFFERS:\n" + "\n".join(diffs[:50]))
sys.exit(1 if diffs else 0)
PY
