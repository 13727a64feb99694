"""The REST API fuzzed from its own OpenAPI schema (schemathesis) against the live server on 127.0.0.1.

Every route, with the token, gets schema-driven requests, valid and invalid: none may answer 5xx, and every answer
must match what the schema documents (status code, content type, body). The datastore has a published model, so
inference, label and model routes run their real paths; no worker runs, so a queued training job stays queued.
Examples are bounded per route to keep the suite's time.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from conftest import TINY_NET, TINY_PATCH  # noqa: E402
from SSLSegmentLib.review.local_backend import LocalBackend  # noqa: E402
from training.datastore import Datastore, import_folder  # noqa: E402

TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 6, "val_interval": 6, "device": "cpu"}


@pytest.fixture(scope="module")
def fuzzed_backend(tmp_path_factory, tiny_dataset):
    from training.worker import Worker

    root = tmp_path_factory.mktemp("fuzz") / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="train:2")
    store.update_settings({"train": TRAIN})
    store.create_job({"init": "scratch"})
    Worker(root, threads=1, poll_s=0.1, heartbeat_s=0.5, log=lambda m: None).run(once=True)
    with LocalBackend(root, with_worker=False, serve_args=["--max-upload-mb", "1"]).start().wait_until_ready() as handle:
        yield handle


@pytest.fixture(scope="module")
def api_schema(fuzzed_backend):
    return schemathesis.openapi.from_url(fuzzed_backend.base_url + "/openapi.json")


def test_no_route_answers_5xx_or_off_its_schema(fuzzed_backend, api_schema):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import positive_data_acceptance

    headers = {"Authorization": f"Bearer {fuzzed_backend.token}"}
    failures, tried = [], 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def call(case):
                case.call_and_validate(headers=headers, timeout=60, excluded_checks=[positive_data_acceptance])

            try:
                call()
                tried += 1
            except Unsatisfiable:  # no schema-invalid request exists (e.g. only string path parameters)
                continue
            except (Exception, BaseExceptionGroup) as exc:  # every operation is tried; failures listed together
                tried += 1
                failures.append(f"{operation.label} ({mode.value}): {str(exc)[:1500]}")
    assert tried >= 25, tried
    assert not failures, "\n\n".join(failures)


EXAMPLES = 12
