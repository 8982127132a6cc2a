"""Property-based run of schemathesis against the captures and pins part of our OpenAPI schema.

A bounded number of generated requests per operation (CI repeats it as is):
no 5xx, every status code, content type, header and body as the schema says,
and schema-invalid input refused with 4xx. ``positive_data_acceptance`` is
excluded on purpose: a body can follow the schema and still be refused with
422 (an unknown run, a token id past the vocabulary), which the schema cannot say.

The operations are driven by hand with hypothesis (``operation.as_strategy()``):
schemathesis' pytest plugin (``from_fixture``) does not run under pytest 9.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from captures_support import make_app, serve
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from attnscope.backend.captures.requests import CaptureLimits

EXAMPLES_PER_OPERATION = 40


@pytest.mark.slow
def test_captures_api_follows_its_schema(tmp_path: Path) -> None:
    app = make_app(tmp_path, limits=CaptureLimits(max_body_bytes=64 * 1024))
    with serve(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        schema = schema.include(path_regex=r"^/api/v1/(captures|pins)")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} == {
            "POST /api/v1/captures", "GET /api/v1/captures",
            "GET /api/v1/captures/{capture_id}", "GET /api/v1/captures/{capture_id}/data",
            "DELETE /api/v1/captures/{capture_id}", "GET /api/v1/captures/input",
            "GET /api/v1/captures/{capture_id}/frame", "GET /api/v1/captures/{capture_id}/heads",
            "POST /api/v1/pins", "GET /api/v1/pins", "GET /api/v1/pins/{pin_id}",
            "PATCH /api/v1/pins/{pin_id}", "DELETE /api/v1/pins/{pin_id}"}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
            def check(case) -> None:
                case.call_and_validate(base_url=url, excluded_checks=[positive_data_acceptance],
                                       timeout=60)

            check()
