"""Deprecated name of jobs/generate.py (the SL-CAI data step is `generate` everywhere now):
runs it with the same arguments, after a deprecation message; removed in the next release."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    print(
        "jobs/sl_data.py is now jobs/generate.py (and sl_data_*.yaml are generate_*.yaml); running it", file=sys.stderr
    )
    sys.argv[0] = str(Path(__file__).with_name("generate.py"))
    runpy.run_path(sys.argv[0], run_name="__main__")
