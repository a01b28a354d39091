"""Off-device tooling: model building, package signing, deploy, local AWS stand-in."""
