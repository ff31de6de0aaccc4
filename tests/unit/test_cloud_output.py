"""What cannot write to an object store yet says so before any work (the S3 tests proper are in
tests/integration/test_cloud_output.py)."""

import pytest


def test_stages_that_cannot_write_to_an_object_store_say_so(tmp_path):
    from cai_ray.config import ConfigError, load_config
    from cai_ray.label.config import LabelConfig
    from cai_ray.pipeline.config import PipelineConfig

    with pytest.raises(ConfigError, match="run its steps alone"):
        load_config(PipelineConfig, None, ["prompts=x.jsonl", "output=s3://b/run"])
    with pytest.raises(ConfigError, match="gold"):
        load_config(
            LabelConfig, None, ["input=x.jsonl", "output=s3://b/l", "gold=g.jsonl", "labeler.model=tiny-random"]
        )
