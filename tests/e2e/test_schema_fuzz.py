"""Property-based fuzz of the whole OpenAPI schema against the real server: no input may cause a 5xx.

Schemathesis generates paths, query strings and bodies from the app's own OpenAPI schema, both
valid ones and (negative mode) ones that break it, and sends them to a live `python -m server`.
A 5xx is a bug: a bad input must get a 4xx that says what is wrong and must leave the server
ready for the next request, so a readiness probe follows every case.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from server.app import create_app
from server.settings import Settings
from tests.e2e.serving import Server, serve
from tests.e2e.test_server_process import make_head

pytestmark = pytest.mark.slow
EXAMPLES = 50  # per operation and mode: keeps the whole fuzz inside make test's budget on 2 cores


def _openapi() -> dict[str, Any]:
    """The schema the server publishes; building it needs no model, so the test ids are known at collection."""
    with tempfile.TemporaryDirectory() as heads_dir:
        return create_app(Settings(heads_dir=Path(heads_dir), device="cpu")).openapi()


SCHEMA = schemathesis.openapi.from_dict(_openapi())
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
VALID, INVALID = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# Invalid inputs exist only where the schema constrains something: a body or a query string (a bare path
# parameter is any string, and a route without parameters has no invalid form).
CASES = [(label, VALID) for label in sorted(OPERATIONS)] + [
    (label, INVALID) for label, op in sorted(OPERATIONS.items()) if len(op.body) or len(op.query)]


@pytest.fixture(scope="module")
def fuzz_server(lively_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    make_head(lively_base_dir, root / "heads" / "math")
    with serve(lively_base_dir, root / "heads", root / "server.log") as running:
        yield running


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_input_causes_a_server_error(label: str, mode: schemathesis.GenerationMode, fuzz_server: Server) -> None:
    session = requests.Session()

    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=fuzz_server.url, session=session, timeout=60)
        assert response.status_code < 500, (
            f"{label} -> {response.status_code}: {response.text[:300]}\nreproduce: {case.as_curl_command()}")
        assert session.get(f"{fuzz_server.url}/readyz", timeout=10).status_code == 200

    check()
