"""A real S3-protocol server for the tests: moto's standalone server, as a subprocess on 127.0.0.1.

Fixtures (imported by conftest.py):
- `s3_endpoint`: one server per test session, its URL; stopped at the end;
- `s3_url`: a fresh bucket on it and `s3://BUCKET/some/prefix`, with the AWS environment pointed
  at the server (fake credentials; the user's ~/.aws is out of the way), so `mp` subprocesses
  started by the test reach it too;
- `s3_strict`: a second server that checks signatures (moto's IAM authentication), with a user
  whose key may do anything and a bucket: for tests of bad credentials.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

KEY_ID, SECRET, REGION = "testing", "testing", "us-east-1"


@dataclass
class Server:
    """A running moto server: its URL, its process and the file its output goes to."""

    endpoint: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.unlink(missing_ok=True)


def start_server(timeout: float = 30) -> Server:
    """Start `python -m moto.server` on a free port and wait for it to say where it listens.
    Its output goes to a file, not a pipe: the server logs every request, and a pipe nobody
    reads would fill and stall it."""
    fd, name = tempfile.mkstemp(prefix="moto-", suffix=".log")
    log = Path(name)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                            stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            return Server(found.group(1), proc, log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    output = log.read_text(errors="replace")
    Server("", proc, log).stop()
    raise RuntimeError(f"moto server did not start:\n{output}")


def client(endpoint: str, key_id: str = KEY_ID, secret: str = SECRET, service: str = "s3"):
    """A boto3 client of the test server, for setting a scene (buckets, damaged objects)."""
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=key_id, aws_secret_access_key=secret)


def aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, where: Path,
            key_id: str = KEY_ID, secret: str = SECRET) -> None:
    """Point the standard AWS environment at `endpoint` with these credentials, and the config
    files somewhere empty, so nothing of the user's ~/.aws takes part."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(where / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(where / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def new_bucket(endpoint: str, **creds: str) -> str:
    """A fresh bucket with a unique name."""
    name = f"mp-test-{uuid.uuid4().hex[:16]}"
    client(endpoint, **creds).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server = start_server()
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    aws_env(monkeypatch, s3_endpoint, tmp_path)
    return f"s3://{new_bucket(s3_endpoint)}/some/prefix"


@dataclass
class Strict:
    """A server that checks signatures, a key pair it knows and a bucket on it."""

    endpoint: str
    key_id: str
    secret: str
    bucket: str


@pytest.fixture(scope="session")
def s3_strict() -> Iterator[Strict]:
    server = start_server()
    try:
        iam = client(server.endpoint, service="iam")
        iam.create_user(UserName="mp")
        iam.put_user_policy(UserName="mp", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="mp")["AccessKey"]
        bucket = new_bucket(server.endpoint)
        # From now on every request must be signed by a key the server knows (moto's control API).
        urllib.request.urlopen(urllib.request.Request(f"{server.endpoint}/moto-api/reset-auth", data=b"0",
                                                      headers={"Content-Type": "text/plain"}))
        yield Strict(server.endpoint, key["AccessKeyId"], key["SecretAccessKey"], bucket)
    finally:
        server.stop()
