"""Fuzzing the server's OpenAPI schema (schemathesis): generated requests, valid and not,
with and without the key, never get a 5xx, and the server stays healthy."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

KEY = "fuzz-key-0123456789abcdef"


@pytest.fixture(scope="module")
def app():
    from cai_ray.config import load_config
    from cai_ray.serve.api import build_app, key_digest
    from cai_ray.serve.config import ServeConfig
    from cai_ray.serve.service import Service

    s = load_config(
        ServeConfig,
        None,
        [
            "policy.model=tiny-random",
            "policy.dtype=float32",
            "policy.threads=1",
            "limits.max_tokens=4",
            "limits.default_max_tokens=2",
            "guardrail_principles=1",
        ],
    )
    return build_app(Service(s), s, key_digest(KEY))


def test_no_generated_request_gets_a_server_error(app):
    """Every operation in the app's OpenAPI schema, 25 generated cases each (schema-valid and
    not), with the key and without: 2xx/4xx only."""
    from hypothesis import given

    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {KEY}"})
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/label", "/v1/critique", "/v1/models"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[not_a_server_error])
            case.call_and_validate(checks=[not_a_server_error])  # without the key: 401, never 5xx

        run()
