"""Record every shipped preset's parameter counts and visual tokens in
tinylmm/assets/zoo_counts.json, from its model built on the meta device. `tinylmm zoo ls`
reads them, so listing imports no ML library; tests/test_zoo.py fails when a record no
longer equals the build (run this script after changing a preset or the model code).

    HF_HUB_OFFLINE=1 python scripts/update_zoo_counts.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylmm.api.zoo import recorded_counts  # noqa: E402
from tinylmm.catalog.zoo import COUNTS  # noqa: E402
from tinylmm.resources import asset  # noqa: E402

if __name__ == "__main__":
    path = asset(COUNTS)
    path.write_text(json.dumps(recorded_counts(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
