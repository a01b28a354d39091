"""The AWS IoT credentials provider, as the capture uploader uses it.

The client lives in :mod:`edgecommon.iot_credentials` because the OTA updater
fetches its S3 credentials the same way.
"""

from edgecommon.iot_credentials import (
    CredentialsError,
    IotCredentialsConfig,
    fetch_credentials,
    iot_credential_provider,
    make_s3_client,
)

__all__ = [
    "CredentialsError",
    "IotCredentialsConfig",
    "fetch_credentials",
    "iot_credential_provider",
    "make_s3_client",
]
