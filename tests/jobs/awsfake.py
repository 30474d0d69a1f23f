"""Stand-ins for the three AWS APIs hostmeter calls: CloudWatch Logs ``FilterLogEvents``, SSM
``GetParameter`` and Secrets Manager ``GetSecretValue`` (plus a recorder of Mackerel API posts).

:class:`FakeAws` answers them in process (an injected fake client); :func:`serve` puts the same
answers behind a real HTTP server on 127.0.0.1 speaking AWS's JSON 1.1 protocol, so that boto3
itself (request signing, serialisation, paging tokens, error parsing) is exercised.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: what boto3 needs to sign a request, and nothing from the developer's own AWS setup
DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret",
             "AWS_DEFAULT_REGION": "ap-northeast-1", "AWS_MAX_ATTEMPTS": "1",
             "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


class FakeAwsError(Exception):
    """What a fake call raises; shaped like botocore's ClientError (``.response``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"An error occurred ({code}): {message}")
        self.response = {"Error": {"Code": code, "Message": message}}


@dataclass
class FakeAws:
    """Log groups of events, parameters and secrets; every call is recorded."""

    groups: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    page_size: int = 2
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: Mackerel API posts the server received: (path, X-Api-Key header, JSON body)
    mackerel: list[tuple[str, str | None, Any]] = field(default_factory=list)

    def put(self, group: str, message: str, *, timestamp: int, ingested: int) -> None:
        events = self.groups.setdefault(group, [])
        events.append({"logStreamName": "job/hostmeter/abc", "timestamp": timestamp,
                       "ingestionTime": ingested, "message": message,
                       "eventId": f"{group}-{len(events)}"})

    # --- the API, as boto3 clients name it -------------------------------------------------

    def filter_log_events(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("FilterLogEvents", kw))
        group = kw["logGroupName"]
        if group not in self.groups:
            raise FakeAwsError("ResourceNotFoundException",
                               "The specified log group does not exist.")
        start = kw.get("startTime", 0)
        end = kw.get("endTime", 2**62)
        matching = [e for e in self.groups[group] if start <= e["timestamp"] <= end]
        offset = int(kw.get("nextToken") or 0)
        page = matching[offset:offset + self.page_size]
        out: dict[str, Any] = {"events": page, "searchedLogStreams": []}
        if offset + self.page_size < len(matching):
            out["nextToken"] = str(offset + self.page_size)
        return out

    def get_parameter(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("GetParameter", kw))
        if kw["Name"] not in self.parameters:
            raise FakeAwsError("ParameterNotFound", "")
        return {"Parameter": {"Name": kw["Name"], "Type": "SecureString",
                              "Value": self.parameters[kw["Name"]], "Version": 1}}

    def get_secret_value(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("GetSecretValue", kw))
        if kw["SecretId"] not in self.secrets:
            raise FakeAwsError("ResourceNotFoundException",
                               "Secrets Manager can't find the specified secret.")
        return {"ARN": kw["SecretId"], "Name": "db", "SecretString": self.secrets[kw["SecretId"]]}

    def client(self, service: str) -> FakeAws:
        return self


_TARGETS = {
    "Logs_20140328.FilterLogEvents": "filter_log_events",
    "AmazonSSM.GetParameter": "get_parameter",
    "secretsmanager.GetSecretValue": "get_secret_value",
}


@contextmanager
def serve(fake: FakeAws) -> Iterator[str]:
    """``fake`` behind an HTTP server on 127.0.0.1; yields its endpoint URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.path.startswith("/api/v0/"):  # Mackerel, on the same server for brevity
                fake.mackerel.append((self.path, self.headers.get("X-Api-Key"), body))
                self._send(200, {"success": True})
                return
            target = self.headers.get("X-Amz-Target", "")
            signed = self.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256")
            if target not in _TARGETS or not signed:
                self._send(400, {"__type": "UnknownOperationException", "message": target})
                return
            try:
                self._send(200, getattr(fake, _TARGETS[target])(**body))
            except FakeAwsError as exc:
                error = exc.response["Error"]
                self._send(400, {"__type": error["Code"], "message": error["Message"]})

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def boto3_client(service: str, endpoint: str) -> Any:
    """A real boto3 client for ``service`` pointed at ``endpoint``, with dummy credentials and
    no retries (a refused call fails at once)."""
    import boto3
    from botocore.config import Config

    return boto3.client(service, endpoint_url=endpoint, region_name="ap-northeast-1",
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                        config=Config(retries={"max_attempts": 1}, connect_timeout=2,
                                      read_timeout=5))
