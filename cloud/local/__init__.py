"""A local stand-in for the AWS side of windedge, on loopback and free ports. It is not AWS.

What runs (each a process of its own, logs in ``<state_dir>/logs/``):

- mosquitto with two listeners on 127.0.0.1: plain MQTT (anonymous) and MQTT
  over mutual TLS (``require_certificate true``; the stand-in's CA signs the
  server and every device certificate, made on the fly with ``cryptography``;
  keys 0600 in ``<state_dir>/pki``, the folder 0700);
- moto's S3 server (boto3 talks to it with ``endpoint_url``), with one bucket;
- the IoT Jobs emulator (``python -m cloud.local``): an MQTT client of that
  broker serving ``$aws/things/<thing>/jobs/...`` as AWS IoT does (see
  ``cloud.local.jobs``), its state in ``<state_dir>/jobs.sqlite`` (jobs and
  executions survive a restart), an admin API over HTTP on loopback
  (``cloud.local.admin``) and an IoT credentials provider over HTTPS with
  client-certificate authentication (``cloud.local.credentials``).

Interface (stable; extend, never rename)::

    from cloud.local import LocalCloud
    with LocalCloud(state_dir=path, things=["dev-1", "dev-2"]) as cloud:   # or start()/stop()
        ep = cloud.endpoints        # Endpoints (frozen dataclass):
        #   mqtt_host ("127.0.0.1"), mqtt_port (plain), mqtt_tls_port (mutual TLS),
        #   s3_endpoint_url, credentials_endpoint ("127.0.0.1:<port>", HTTPS),
        #   role_alias, admin_url, ca_path, bucket, region
        ident = cloud.provision_thing("dev-3")   # DeviceIdentity: thing_name, cert_path,
                                                 # key_path, ca_path (registers the thing)
        cloud.jobs.create_job("job-1", targets=["dev-1"], document={...},
                              rollout_config={"maximumPerMinute": 10},
                              abort_config={"criteriaList": [...]},
                              timeout_config={"inProgressTimeoutInMinutes": 5},
                              presigned_url_config={"expiresInSec": 600})
        cloud.jobs.describe_job("job-1"); cloud.jobs.list_jobs(); cloud.jobs.cancel_job("job-1")
        cloud.jobs.describe_execution("job-1", "dev-1"); cloud.jobs.list_executions("job-1")
        cloud.env_for("dev-1")      # dict[str, str] a device process needs (WINDEDGE_OTA_*)
        cloud.s3_client()           # boto3 S3 client of the stand-in
        cloud.restart_emulator()    # the emulator alone (persistence tests)
        cloud.restart_broker()      # mosquitto alone, same ports (reconnect tests)
        cloud.add_to_group("dev-1", "turbines")   # thing groups (deploy --thing-group)

``LocalCloud(..., ports=Ports(mqtt=1883, ...))`` asks for fixed ports (a taken
port is a ``LocalCloudError``, never a silent fallback); ``minute_seconds``
shortens the "minute" of job timeouts and rollout rates (60 by default).
``env_for`` gives ``WINDEDGE_OTA_THING_NAME``, ``WINDEDGE_OTA_IOT_ENDPOINT``,
``WINDEDGE_OTA_IOT_PORT`` (mutual TLS), ``WINDEDGE_OTA_IOT_PLAIN_PORT``,
``WINDEDGE_OTA_CERT_PATH``, ``WINDEDGE_OTA_KEY_PATH``, ``WINDEDGE_OTA_CA_PATH``,
``WINDEDGE_OTA_CREDENTIALS_ENDPOINT``, ``WINDEDGE_OTA_ROLE_ALIAS``,
``WINDEDGE_OTA_S3_ENDPOINT_URL``, ``WINDEDGE_OTA_REGION`` and ``AWS_DEFAULT_REGION``.

Differences from AWS IoT Core worth knowing: the broker does not deliver
``accepted``/``rejected`` replies to a client that did not subscribe to them
(awsiotsdk's clients subscribe, so this does not show); the credentials
endpoint listens on a free port, not 443 (awscrt's x509 provider insists on
443, so a device uses an HTTPS client of its own, e.g. ``requests`` with
``cert=``); there are no IoT policies: any certificate the CA signed may use
any topic.
"""

from __future__ import annotations

from cloud.local.admin import JobsAdmin
from cloud.local.jobs import AdminError
from cloud.local.launcher import (
    DEFAULT_BUCKET,
    DEFAULT_ROLE_ALIAS,
    Endpoints,
    LocalCloud,
    LocalCloudError,
    Ports,
)
from cloud.local.pki import DeviceIdentity

__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_ROLE_ALIAS",
    "AdminError",
    "DeviceIdentity",
    "Endpoints",
    "JobsAdmin",
    "LocalCloud",
    "LocalCloudError",
    "Ports",
]
