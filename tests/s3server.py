"""moto's S3 server as a test fixture: a real S3 HTTP API on loopback, not patched calls."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from cogbert_cloud.fleet.broker import free_port


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server: a real S3 HTTP API on loopback."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline, "moto server did not start"
        time.sleep(0.1)
    import boto3
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="fleet")
    yield {"endpoint": endpoint, "env": env}
    proc.terminate()
    proc.wait(10)


