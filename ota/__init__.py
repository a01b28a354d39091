"""edge-ota: the OTA updater. AWS IoT Jobs in, verified model versions out.

One job at a time runs through a persisted state machine (``ota.machine``):
download (S3 via the IoT credentials provider, or an HTTPS presigned URL with
Range resume), verify (the package module the agent uses), install
(``<models>/<name>/<version>/``, atomically), activate (the agent's hot swap),
check (live predictions), commit; any failure after activation swaps the
agent back. The IoT Jobs adapter (``ota.jobs``) is thin; the core
(``ota.updater``) knows neither MQTT nor gRPC messages.
"""
