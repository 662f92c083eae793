"""The public names of `import expvault`, pinned so a change to them is deliberate."""

import expvault


def test_public_names() -> None:
    assert sorted(expvault.__all__) == sorted(
        [
            "AlreadyExistsError",
            "DataLossError",
            "ExpvaultError",
            "Follow",
            "Followed",
            "InvalidArgumentError",
            "InvalidNameError",
            "NotFoundError",
            "OffsetGapError",
            "PermissionDeniedError",
            "RemoteVault",
            "ResourceExhaustedError",
            "SampleIterator",
            "SchemaMismatchError",
            "StorageError",
            "StreamBusyError",
            "UnauthenticatedError",
            "UnavailableError",
            "Vault",
            "VaultReader",
            "__version__",
            "counted",
            "tls_credentials",
        ]
    )
    for name in expvault.__all__:
        assert hasattr(expvault, name), name
