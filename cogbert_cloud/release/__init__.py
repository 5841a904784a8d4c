"""Steps 7 and 8, sign and roll out: signing keys and manifests (``signing``), the release
registry and audit log (``registry``), release offers to devices (``distribution``) and the
staged rollout (``rollout/``)."""
