"""`cai-ray generate`: SL-CAI data. Each red-team prompt is answered, critiqued against a
sampled principle and revised, N rounds, on an engine actor pool (``run.py``; its config in
``config.py``)."""
