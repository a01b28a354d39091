"""Fixtures of the OTA tests: the local AWS stand-in, signed archives, TLS, and devices.

The devices and helpers themselves are in ``ota_devices``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_devices import Archives, MakeDevice, make_devices
from ota_harness import LocalTls, PackageServer, make_tls

from cloud.local import LocalCloud
from tests.conftest import StartAgent
from tests.harness import short_dir


@pytest.fixture(scope="session")
def cloud() -> Iterator[LocalCloud]:
    """The local AWS stand-in (mosquitto plain + mTLS, moto S3, Jobs emulator, credentials)."""
    base = short_dir("weota-cloud-")
    stand_in = LocalCloud(state_dir=base / "cloud")
    stand_in.start()
    try:
        yield stand_in
    finally:
        stand_in.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def archives(
    cloud: LocalCloud, dev_key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory
) -> Archives:
    return Archives(tmp_path_factory.mktemp("ota-archives"), dev_key, cloud)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> LocalTls:
    return make_tls(tmp_path_factory.mktemp("ota-tls"))


@pytest.fixture(scope="session")
def package_server(tls: LocalTls) -> Iterator[PackageServer]:
    """HTTPS with Range, serving archives by URL path (presigned-URL jobs); faults reset per use."""
    server = PackageServer(tls).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def device(cloud: LocalCloud, start_agent: StartAgent, tls: LocalTls) -> Iterator[MakeDevice]:
    """``device(**settings)``: a fresh turbine serving wind-turbine 1.0 (one per call)."""
    with make_devices(cloud, start_agent, tls) as make:
        yield make


@pytest.fixture(scope="module")
def module_device(
    cloud: LocalCloud, module_agent_factory: StartAgent, tls: LocalTls
) -> Iterator[MakeDevice]:
    """Like ``device``, for a turbine a whole module shares."""
    with make_devices(cloud, module_agent_factory, tls) as make:
        yield make
