"""A real S3-compatible server for tests: moto's server mode, in its own process on 127.0.0.1.

    with s3_server() as endpoint:          # http://127.0.0.1:PORT, the process stopped on exit
        make_bucket(endpoint, "lake")
        os.environ.update(s3_env(endpoint))   # what the lake reads (AWS_ENDPOINT_URL, keys, region)

Nothing here reaches the network: the server listens on the loopback interface only, and the keys are
the dummy ones moto accepts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

KEY, SECRET, REGION = "fusemix-test", "fusemix-test-secret", "us-east-1"


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a lake on this server needs (the standard AWS variables)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": REGION,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(timeout_s: float = 30.0) -> Iterator[str]:
    """Starts `python -m moto.server` on a free loopback port and yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with status {proc.returncode} before it listened")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not answer on {endpoint} within {timeout_s} s"
                    ) from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    )
    client.create_bucket(Bucket=bucket)


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under `prefix` (what the server holds, read independently of Lance)."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    )
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys
