"""`cai-ray label`: RL-CAI preference labels (RLAIF). The policy samples answer pairs
(``pairs.py``), the AI labeler picks the better one per principle, in both orders, as soft
probabilities (``run.py``; the method is ``core.labeler``; config in ``config.py``)."""
