#!/usr/bin/env bash
# The embedded default, timed: `tinylmm train --recipe share` (toy preset, shapes data).
# Prints the wall time, peak RSS and the held-out accuracy by type, and POPE's splits.
# Usage: bash bench/default_run.sh [RUN_DIR] [more train arguments, e.g. train.seed=1 --recipe base]
set -euo pipefail
out=${1:-runs/bench-default}
shift || true
rm -rf "$out"
HF_HUB_OFFLINE=1 /usr/bin/time -f "wall %e s, peak RSS %M KB" tinylmm train --recipe share -o "$out" "$@"
python - "$out" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/eval/shapes.json"))
print(f"held-out accuracy {r['accuracy']:.1%} (chance {r['chance']:.1%}) on {r['n']} questions")
for t, v in r["by_type"].items():
    print(f"  {t:9s} {v['accuracy']:.1%} (chance {v['chance']:.1%})")
for split, m in r.get("pope", {}).items():
    print(f"  POPE {split:11s} acc {m['accuracy']:.1%} P {m['precision']:.1%} R {m['recall']:.1%} "
          f"F1 {m['f1']:.1%} yes {m['yes_ratio']:.1%}")
PY
