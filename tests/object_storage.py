"""An S3-compatible server on loopback for tests: moto in server mode, reached through the AWS_* variables."""
from __future__ import annotations

import os
from contextlib import contextmanager

from tests.builds import free_port

BUCKET = "pairforge-test"


@contextmanager
def s3_server(bucket: str = BUCKET):
    """Start moto on 127.0.0.1, create `bucket`, set AWS_ENDPOINT_URL and keys; undo all of it on exit."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield bucket
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def object_keys(bucket: str, prefix: str = "") -> list[str]:
    """Every key under prefix, listed with boto3 (not the code under test)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
