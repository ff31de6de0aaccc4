"""A folder whose files run as scripts (``python tests/support/zero_ranks.py``, ``python
jobs/bench/guard.py``) is first on ``sys.path`` there, so a module in it named like a
standard-library module shadows it in the script and in everything it imports: a
``tests/support/http.py`` once broke ``import torch`` inside the ZeRO rank script
(``urllib.request`` -> ``http.client``)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_DIRS = ["tests/support", "tests/unit", "tests/integration", "jobs", "jobs/bench"]


def test_no_script_folder_shadows_the_standard_library():
    clashes = []
    for d in SCRIPT_DIRS:
        for p in sorted((ROOT / d).iterdir()):
            name = p.stem if p.suffix == ".py" else (p.name if (p / "__init__.py").exists() else None)
            if name in sys.stdlib_module_names:
                clashes.append(f"{d}/{p.name}")
    assert not clashes, f"these shadow standard-library modules when their folder runs scripts: {clashes}"
