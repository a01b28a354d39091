"""windedge detection daemon: sensor streams to anomaly verdicts."""
