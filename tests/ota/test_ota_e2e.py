"""End to end on the local stand-in: a real edge-ota, agent, broker (mTLS), S3 and Jobs emulator."""

from __future__ import annotations

from conftest import Archives, MakeDevice


def test_workshop_document_deploys_version_2(device: MakeDevice, archives: Archives) -> None:
    dev = device()
    v2 = archives.get("2.0")
    dev.start_ota()
    job = dev.deploy(v2)
    final = dev.wait_final(job)
    assert final["status"] == "SUCCEEDED", final
    assert final["statusDetails"]["from_version"] == "1.0"
    assert final["statusDetails"]["to_version"] == "2.0"
    assert dev.serving() == "2.0"
    assert dev.watch.finals(job) == ["SUCCEEDED"]
