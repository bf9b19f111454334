#!/usr/bin/env bash
# The one install recipe, shared by `make` (the dev venv CI tests), and both Docker images.
#   docker/install.sh PYTHON [EXTRAS] [--editable]
# Torch comes first and pinned by constraints.txt, so pip never picks another build.
set -euo pipefail
PY=${1:?usage: install.sh PYTHON [EXTRAS] [--editable]}
EXTRAS=${2:-}
MODE=${3:-}
cd "$(dirname "$0")/.."
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -c constraints.txt torch torchvision
target="."
[ -n "$EXTRAS" ] && target=".[${EXTRAS}]"
if [ "$MODE" = "--editable" ]; then
  "$PY" -m pip install -q -c constraints.txt -e "$target"
else
  "$PY" -m pip install -q -c constraints.txt "$target"
fi
"$PY" -c "import geoseg.cli, torch; print('geoseg installed, torch', torch.__version__)"
# numba compiles the polygon tracer, the edge merge and the sieve once and caches the machine
# code beside them: here, not in every worker of the first run
"$PY" -c "import numpy; from geoseg.polygonize import polygonize, union_shared_edges; from geoseg.vectorize import sieve
classes = numpy.array([[0, 0], [0, 1]], numpy.uint8)
polygonize(classes, 255, numpy.ones((2, 2), numpy.uint8)); union_shared_edges(polygonize(classes, 255)); sieve(classes, 2)"
