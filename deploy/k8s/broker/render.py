"""Render the broker's mosquitto.conf and acl for the Kubernetes layout.

    .venv/bin/python deploy/k8s/broker/render.py PKI_DIR [--out DIR]

Runs the real generator (``cogbert broker config``, :func:`cogbert_cloud.fleet.broker.write_config`)
against the offline PKI directory, in a scratch directory, then rewrites the paths it wrote to
the ones the broker pod sees:

    PKI_DIR                   -> /etc/cogbert/pki           (ConfigMap + Secret, projected)
    the scratch config dir    -> /etc/mosquitto/cogbert     (the generated ConfigMap)
    the scratch data dir      -> /mosquitto/data            (the StatefulSet's volume)
    the ACL plugin            -> /usr/lib/mosquitto/cogbert_acl.so (built into the image)
    user <whoever ran this>   -> user mosquitto             (ignored: the pod never runs as root)

Why not run the generator in the pod (an init container)? It opens the PKI with the CA key
present (``PKI.open``) and reads ``index.json`` to write one ACL block per service identity:
the CA key must stay offline, so the config is rendered where the PKI lives and shipped as a
ConfigMap. The committed ``mosquitto.conf`` and ``acl`` beside this script are its output for a
PKI with the services ``ingest`` and ``rollout``; ``tests/test_k8s.py`` re-renders them and fails
when they drift from the generator. Issue another service identity (``ingest-eu``,
``rollout-2``), and you render again: its ACL block comes from the PKI's index.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
POD_PKI = "/etc/cogbert/pki"
POD_CONF = "/etc/mosquitto/cogbert"
POD_DATA = "/mosquitto/data"
POD_PLUGIN = "/usr/lib/mosquitto/cogbert_acl.so"
DEVICE_PORT = 8883
SERVICE_PORT = 8884


def render(pki_dir: Path) -> dict[str, str]:
    """The pod's ``mosquitto.conf`` and ``acl`` for ``pki_dir``, as {file name: text}."""
    from cogbert_cloud.fleet.broker import BrokerConfig, write_config

    pki_dir = Path(pki_dir).resolve()
    # The plugin is compiled into the broker image (deploy/docker/Dockerfile.broker); naming it
    # here keeps the generator from compiling one on this machine.
    saved = os.environ.get("COGBERT_MOSQUITTO_PLUGIN")
    os.environ["COGBERT_MOSQUITTO_PLUGIN"] = POD_PLUGIN
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp).resolve() / "conf"
            data = Path(tmp).resolve() / "data"
            write_config(pki_dir, out, BrokerConfig(port=DEVICE_PORT, service_port=SERVICE_PORT,
                                                    data_dir=data))
            files = {name: (out / name).read_text() for name in ("mosquitto.conf", "acl")}
    finally:
        if saved is None:
            os.environ.pop("COGBERT_MOSQUITTO_PLUGIN", None)
        else:
            os.environ["COGBERT_MOSQUITTO_PLUGIN"] = saved
    conf = files["mosquitto.conf"]
    # Longest paths first: the data dir and the config dir share the scratch prefix.
    for local, pod in ((data, POD_DATA), (out, POD_CONF), (pki_dir, POD_PKI)):
        conf = conf.replace(str(local), pod)
    conf = re.sub(r"(?m)^user .*$", "user mosquitto", conf)
    files["mosquitto.conf"] = conf
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pki", type=Path, help="the offline PKI directory (cogbert pki init)")
    p.add_argument("--out", type=Path, default=HERE, help="where to write mosquitto.conf and acl")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, text in render(a.pki).items():
        (a.out / name).write_text(text)
        print(f"wrote {a.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
