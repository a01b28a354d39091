"""Temporary AWS credentials from the AWS IoT credentials provider (IOT_JOBS.md section 3).

The device proves who it is with its X.509 certificate (mutual TLS) and gets
short-lived credentials of the IAM role behind a *role alias*:

    GET https://<prefix>.credentials.iot.<region>.amazonaws.com/role-aliases/<alias>/credentials
    x-amzn-iot-thingname: <thing>
    -> {"credentials": {"accessKeyId", "secretAccessKey", "sessionToken", "expiration"}}

The agent's capture uploader and the OTA updater both use it. This is what
the original SageMaker Edge agent did (its
``sagemaker_edge_provider_aws_iot_cred_endpoint`` key holds that full URL).
We speak it with the standard library's HTTPS client rather than awscrt's
x509 provider, because awscrt's is fixed to port 443 (IOT_JOBS.md), which
would make the provider impossible to stand in for on loopback. botocore
refreshes the credentials before they expire (``RefreshableCredentials``).
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from botocore.credentials import CredentialProvider
    from mypy_boto3_s3 import S3Client

_ROLE_ALIAS_PATH = re.compile(r"/role-aliases/([^/]+)/credentials/?")
_ROLE_ALIAS_RE = re.compile(r"[\w=,@-]{1,128}")


class CredentialsError(Exception):
    """The credentials provider could not be reached or refused us (transient for uploads)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IotCredentialsConfig:
    host: str
    port: int
    role_alias: str
    thing_name: str
    cert_file: Path
    key_file: Path
    ca_file: Path | None  # None: the system's trust store
    timeout: float = 10.0

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/role-aliases/{self.role_alias}/credentials"

    @classmethod
    def parse(
        cls,
        *,
        endpoint: str,
        role_alias: str | None,
        thing_name: str,
        cert_file: Path | None,
        key_file: Path | None,
        ca_file: Path | None,
        timeout: float = 10.0,
    ) -> IotCredentialsConfig:
        """From the agent's settings; ValueError says what is missing or wrong."""
        text = endpoint.strip()
        parsed = urllib.parse.urlsplit(text if "://" in text else f"https://{text}")
        if parsed.scheme != "https" or not parsed.hostname:
            raise ValueError(f"IoT credentials endpoint {endpoint!r} must be https://host[:port]")
        match = _ROLE_ALIAS_PATH.fullmatch(parsed.path or "")
        alias = role_alias
        if match is not None:
            if role_alias and role_alias != match.group(1):
                raise ValueError(
                    f"IoT role alias {role_alias!r} differs from the one in the endpoint URL "
                    f"({match.group(1)!r})"
                )
            alias = match.group(1)
        elif parsed.path not in ("", "/"):
            raise ValueError(
                f"IoT credentials endpoint {endpoint!r}: expected a host name or "
                "https://<host>/role-aliases/<alias>/credentials"
            )
        if not alias or not _ROLE_ALIAS_RE.fullmatch(alias):
            raise ValueError("IoT credentials provider needs a role alias")
        if cert_file is None or key_file is None:
            raise ValueError("IoT credentials provider needs the device certificate and key file")
        return cls(
            host=parsed.hostname,
            port=parsed.port or 443,
            role_alias=alias,
            thing_name=thing_name,
            cert_file=cert_file,
            key_file=key_file,
            ca_file=ca_file,
            timeout=timeout,
        )


def fetch_credentials(config: IotCredentialsConfig) -> dict[str, str]:
    """One call to the provider; botocore's metadata keys (access_key, ..., expiry_time)."""
    try:
        context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot load the device certificate or CA: {exc}") from exc
    connection = http.client.HTTPSConnection(
        config.host, config.port, context=context, timeout=config.timeout
    )
    try:
        connection.request(
            "GET",
            f"/role-aliases/{urllib.parse.quote(config.role_alias)}/credentials",
            headers={"x-amzn-iot-thingname": config.thing_name, "Accept": "application/json"},
        )
        response = connection.getresponse()
        body = response.read(1024 * 1024)
    except (OSError, http.client.HTTPException) as exc:
        raise CredentialsError(f"IoT credentials provider {config.url}: {exc}") from exc
    finally:
        connection.close()
    if response.status != 200:
        detail = body[:200].decode("utf-8", errors="replace")
        raise CredentialsError(
            f"IoT credentials provider {config.url} answered HTTP {response.status}: {detail}"
        )
    try:
        creds = json.loads(body)["credentials"]
        return {
            "access_key": str(creds["accessKeyId"]),
            "secret_key": str(creds["secretAccessKey"]),
            "token": str(creds["sessionToken"]),
            "expiry_time": str(creds["expiration"]),
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise CredentialsError(
            f"IoT credentials provider {config.url}: unexpected answer ({exc})"
        ) from exc


def iot_credential_provider(config: IotCredentialsConfig) -> CredentialProvider:
    """A botocore credential provider backed by the IoT credentials provider."""
    # botocore.credentials costs ~150 ms to import: only devices that upload to S3 pay it
    from botocore.credentials import (  # noqa: PLC0415
        CredentialProvider,
        RefreshableCredentials,
    )

    def fetch() -> dict[str, str]:
        return fetch_credentials(config)

    class IotCredentialProvider(CredentialProvider):
        METHOD = "iot-credentials-provider"
        CANONICAL_NAME = "IotCredentialsProvider"

        def load(self) -> RefreshableCredentials:
            return RefreshableCredentials.create_from_metadata(
                metadata=fetch(), refresh_using=fetch, method=self.METHOD
            )

    return IotCredentialProvider()


def make_s3_client(
    *,
    region: str | None,
    endpoint_url: str | None,
    iot: IotCredentialsConfig | None,
    timeout: float,
) -> S3Client:
    """A boto3 S3 client: credentials from the IoT provider when ``iot`` is given.

    boto3's own retries are off: callers retry with tenacity, with backoff, and
    decide what is transient.
    """
    # boto3 costs ~150 ms and ~30 MB: only processes that talk to S3 pay for it
    import boto3  # noqa: PLC0415
    import botocore.session  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    session = botocore.session.get_session()
    if iot is not None:
        resolver = session.get_component("credential_provider")
        resolver.insert_before("env", iot_credential_provider(iot))
    return boto3.session.Session(botocore_session=session).client(
        "s3",
        region_name=region,
        endpoint_url=endpoint_url,
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 1},
        ),
    )


__all__ = [
    "CredentialsError",
    "IotCredentialsConfig",
    "fetch_credentials",
    "iot_credential_provider",
    "make_s3_client",
]
