"""`cai-ray pipeline`: the whole method as one resumable run, each stage's output the next
one's input, with the lineage in pipeline.json (``run.py``; config in ``config.py``)."""
