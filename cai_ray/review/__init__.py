"""Human review where the AI labeler is unsure (HRLAIF): the queue `cai-ray label` writes to
OUTPUT/review/, the append-only store of human labels, and (server.py) the review page."""
