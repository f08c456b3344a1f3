#!/usr/bin/env bash
# Mutation testing of rsmatch/algorithms/, rsmatch/csqueue.py, rsmatch/evaluate.py and
# rsmatch/benchmark/split.py against the fast tests named in pyproject.toml [tool.mutmut];
# survivors are explained in docs/mutation.md. Needs `pip install -e ".[mutation]"`. Results
# persist in mutants/ (ignored by git), so a rerun only retests what changed; delete it for a
# fresh run. MUTMUT_CHILDREN sets the workers (default 2).
#   tools/mutation.sh                                # everything
#   tools/mutation.sh 'rsmatch.csqueue*'             # one module (mutmut's mutant-name globs)
#   MUTMUT_CHILDREN=1 tools/mutation.sh 'rsmatch.benchmark.split*'
set -euo pipefail
source "$(dirname "$0")/header.sh"
[[ ${1:-} == -h || ${1:-} == --help ]] && { print_header "$0"; exit 0; }
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
unset PYTHONPATH  # mutmut puts its mutated copy first on sys.path
python -m mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@"
python -m mutmut results
