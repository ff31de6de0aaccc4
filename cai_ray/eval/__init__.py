"""`cai-ray eval`: harmlessness, over-refusal and helpfulness with intervals. Every model
answers and the judge scores as Ray Data stages (``stages.py``), ``run.py`` computes the
metrics (``core.eval_math``) and ``report.py`` writes report.html; config in ``config.py``."""
