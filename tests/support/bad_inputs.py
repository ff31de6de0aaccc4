"""What the unit and the integration tests of bad_inputs share."""

import re
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad_inputs"


def _tracebacks(text: str) -> bool:
    """A traceback of ours in the CLI's output. Python's own "--- Logging error ---" reports
    are left out: Ray Data's log handler keeps the stderr of the first test that ran a
    dataset, which pytest has closed since (an artifact of many CLI runs in one process)."""
    text = re.sub(r"--- Logging error ---.*?Arguments: [^\n]*\n", "", text, flags=re.S)
    return "Traceback" in text
