#!/usr/bin/env bash
# The declared version floors, proven: a fresh venv with torch, transformers, diffusers and peft at the
# lowest versions pyproject.toml admits (">=X" installed as "==X"; every other dependency as pip resolves
# it), then the model, checkpoint, text-encoder, codec, reward-model and FSDP (--shard-base) tests run there
# against this tree. Writes results/floor_check.json (versions installed, tests, exit code, seconds).
#
#   bash bench/floor_check.sh [VENV_DIR]     # default: a temporary folder, deleted afterwards
#   FLOOR_CHECK_RESULTS=FILE bash bench/floor_check.sh   # the JSON elsewhere (the slow test does)
#
# Needs the package index (PyPI's Linux torch wheels are CUDA builds: ~0.8 GB, plus ~2.5 GB of nvidia-*
# wheels that torch needs even to import on a CPU; ~6 GB installed) and ~10 minutes on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="${1:-}"
if [[ -z "$VENV" ]]; then
    VENV="$(mktemp -d)/floor-venv"
    trap 'rm -rf "$(dirname "$VENV")"' EXIT
fi
TESTS=(tests/test_model.py tests/test_checkpoint.py tests/test_text_codec.py tests/test_decode.py
       tests/test_reward_models.py tests/test_shard_base.py)
"$PY" -m venv "$VENV"
# the four floors as pins, the rest of the dependencies (and the dev extra) as declared
"$PY" - "$ROOT/pyproject.toml" > "$VENV/floors.txt" 3> "$VENV/requirements.txt" <<'EOF'
import os, re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = project["dependencies"] + project["optional-dependencies"]["dev"]
floors = {"torch", "transformers", "diffusers", "peft"}
with os.fdopen(3, "w") as rest:
    for d in deps:
        name, op, version = re.match(r"^([A-Za-z0-9_.-]+)\s*(>=|==)?\s*([^,;\s]*)", d).groups()
        if name in floors:
            assert op == ">=", d
            print(f"{name}=={version}")
        else:
            print(d, file=rest)
EOF
start=$(date +%s)
"$VENV/bin/pip" install -q -r "$VENV/floors.txt" -r "$VENV/requirements.txt"
installed=$("$VENV/bin/python" -c "import importlib.metadata as m; import json; print(json.dumps({p: m.version(p) for p in ('torch', 'transformers', 'diffusers', 'peft', 'huggingface_hub', 'safetensors', 'numpy')}))")
echo "installed: $installed"
set +e
(cd "$ROOT" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$ROOT" "$VENV/bin/python" -m pytest -q -m "not slow" \
    -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$VENV/pytest.log" | tail -15)
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E "passed|failed|error" "$VENV/pytest.log" | tail -1)
RESULTS="${FLOOR_CHECK_RESULTS:-$ROOT/results/floor_check.json}"
mkdir -p "$(dirname "$RESULTS")"
"$PY" - "$RESULTS" "$installed" "$rc" "$summary" "$(( $(date +%s) - start ))" "${TESTS[@]}" <<'EOF'
import json, sys
out, installed, rc, summary, seconds, *tests = sys.argv[1:]
json.dump({"bench": "bench/floor_check.sh", "installed": json.loads(installed), "tests": tests,
           "pytest_exit": int(rc), "pytest_summary": summary, "seconds": int(seconds)}, open(out, "w"), indent=1)
EOF
echo "wrote $RESULTS (pytest exit $rc: $summary)"
exit "$rc"
