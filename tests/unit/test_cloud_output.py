"""Outputs on an object store: a real S3 API (moto's server on 127.0.0.1) through pyarrow's S3
filesystem and the standard AWS variables. Parts, rejects and the manifest land as objects;
exactly-once and resume hold without any rename, including after a run killed mid-way; eval
writes its stages, report and metrics there too."""

import pytest


def test_stages_that_cannot_write_to_an_object_store_say_so(tmp_path):
    from cai_ray.config import ConfigError, LabelConfig, RMTrainConfig, load_config
    from cai_ray.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match="checkpoint.storage=s3://"):
        load_config(RMTrainConfig, None, ["data=x.jsonl", "output=s3://b/rm"])
    with pytest.raises(ConfigError, match="run generate / label / eval alone"):
        load_config(PipelineConfig, None, ["prompts=x.jsonl", "output=s3://b/run"])
    with pytest.raises(ConfigError, match="gold"):
        load_config(
            LabelConfig, None, ["input=x.jsonl", "output=s3://b/l", "gold=g.jsonl", "labeler.model=tiny-random"]
        )
