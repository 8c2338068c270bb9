#!/usr/bin/env bash
# Run here, where the package registries are reachable, before a session on a lent GPU machine:
# downloads into .whl/ (git-ignored) the wheels of what that machine's image lacks (Python 3.12,
# x86_64): grain and its array_record and portpicker, ml_collections, tensorboardX, 4.6 MB.
# The GPU scripts install them from .whl/ (benchmarks/gpu_common.sh); carry .whl with the call.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl \
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5
ls -la .whl
