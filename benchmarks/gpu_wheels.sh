#!/usr/bin/env bash
# The wheels benchmarks/gpu_feed.sh needs on a GPU machine that cannot reach a registry (its image has Python 3.12,
# CUDA torch, torchvision, transformers, pyarrow, numpy, pillow, pynvml; not Ray or pydantic). Run HERE, where pip
# reaches the registry; it fills .whl/ (git-ignored), which the device run carries. Ray's wheel (79 MB) is trimmed of
# what a local Ray Data job never loads (the Java jars, the dashboard's web client, RLlib) to about 43 MB, so the
# wheels and the working tree stay under the 64 MiB a device run may carry.
#
#     bash benchmarks/gpu_wheels.sh            # then: run(command="bash benchmarks/gpu_feed.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.whl
mkdir -p "$OUT"
# Versions: this repository's pins (requirements.txt) and what they resolved to here; one version of each.
WHEELS=(ray==2.60.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
        typing-extensions==$("$PY" -c 'import importlib.metadata as m; print(m.version("typing_extensions"))'))
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" "${WHEELS[@]}"
"$PY" - "$OUT" <<'EOF'
import base64, hashlib, pathlib, sys, zipfile

folder = pathlib.Path(sys.argv[1])
drop = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/")
for whl in folder.glob("ray-*.whl"):
    with zipfile.ZipFile(whl) as z:
        if not any(n.startswith(drop) for n in z.namelist()):
            continue  # trimmed already
        items = [(i, z.read(i)) for i in z.infolist() if not i.filename.startswith(drop)]
    record = next(i for i, _ in items if i.filename.endswith(".dist-info/RECORD"))
    lines = []
    for i, data in items:
        if i is record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{i.filename},sha256={digest},{len(data)}")
    lines.append(f"{record.filename},,")
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for i, data in items:
            out.writestr(i, "\n".join(lines) + "\n" if i is record else data)
    tmp.replace(whl)
    print(f"trimmed {whl.name}: {whl.stat().st_size / 1e6:.1f} MB")
EOF
du -sh "$OUT"
