"""``hostmeter webhooks`` and ``hostmeter run deliver-webhooks`` through click, against a real
receiver on 127.0.0.1.

- ``add`` takes the secret from a file, stdin or an environment variable (never argv), refuses
  bad URLs, unknown tenants, empty secrets and a missing or double choice with a one-line error
  and exit 2; ``endpoints`` shows that a secret is set, never the secret.
- a receiver that answers 503 until the retry window closes: the delivery is dead, shown by
  ``list --failed``; ``redeliver ID`` (and ``--all-failed``) sends the same event again once
  it recovers; unknown ids are exit 2.
- ``remove`` gives up the endpoint's pending deliveries.
- the secret appears in no command output and in no log file, through a whole flow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.engine import Engine

from billing import outbox
from jobs import deliver_webhooks
from jobs.cli import cli as hostmeter_cli
from jobs.runtime.context import JobContext, JobResult, run_job
from jobs.synthetic.receiver import Receiver, Respond
from metering.models import tenants
from metering.settings import Settings

SECRET = "whsec-cli-test-a94f3e7b51"


@pytest.fixture
def hm(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("HOSTMETER_DATABASE_URL", db_url)
    monkeypatch.setenv("HOSTMETER_LOG_DIR", str(tmp_path / "logs"))
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None
               ) -> Result:
        return runner.invoke(hostmeter_cli, list(args), input=input, env=env,
                             catch_exceptions=False)

    return invoke


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "hook.secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture
def with_tenants(engine: Engine) -> dict[str, int]:
    with engine.begin() as conn:
        return {t: conn.execute(sa.insert(tenants).values(key=t).returning(tenants.c.id))
                .scalar_one() for t in ("acme", "globex")}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(SECRET) as r:
        yield r


def enqueue(engine: Engine, ids: dict[str, int], tenant: str, *keys: str,
            now: datetime) -> None:
    with engine.begin() as conn:
        outbox.enqueue(conn, [outbox.Event(type="usage.threshold", tenant=tenant,
                                           tenant_id=ids[tenant], key=k, data={"k": k})
                              for k in keys], now=now)


def deliver(engine: Engine, now: datetime, **conf: Any) -> JobResult:
    settings = Settings(webhook_timeout_s=1.0, **conf)
    ctx = JobContext(engine=engine, settings=settings, clock=lambda: now)
    return run_job("deliver-webhooks", deliver_webhooks.run, ctx, now)


def output(result: Result) -> str:
    return result.stdout + result.stderr


def one_error(result: Result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("hostmeter: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- endpoints ---------------------------------------------------------------------------------


def test_add_from_a_file_stdin_or_the_environment(hm: Any, with_tenants: dict[str, int],
                                                  secret_file: Path) -> None:
    r = hm("webhooks", "add", "--url", "https://acme.example/h", "--tenant", "acme",
           "--secret-file", str(secret_file))
    assert r.exit_code == 0 and "webhook endpoint 1 added: tenant acme" in r.output
    r = hm("webhooks", "add", "--url", "https://all.example/h", "--global", "--secret-file", "-",
           input=SECRET + "\n")
    assert r.exit_code == 0 and "every tenant" in r.output
    r = hm("webhooks", "add", "--url", "http://127.0.0.1:9/h", "--tenant", "globex",
           "--secret-env", "HOOK_SECRET", "--format", "json", env={"HOOK_SECRET": SECRET})
    assert r.exit_code == 0 and json.loads(r.stdout)["secret"] == "set"
    listed = hm("webhooks", "endpoints", "--format", "json")
    assert [(e["id"], e["tenant"], e["url"], e["secret"]) for e in json.loads(listed.stdout)] == [
        (1, "acme", "https://acme.example/h", "set"), (2, None, "https://all.example/h", "set"),
        (3, "globex", "http://127.0.0.1:9/h", "set")]
    table = hm("webhooks", "endpoints")
    assert "(every tenant)" in table.output and "enabled" in table.output
    for result in (r, listed, table):
        assert SECRET not in output(result)


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "http://hooks.example.com/h", "--tenant", "acme"], "must use https"),
    (["--url", "https://", "--tenant", "acme"], "not an https"),
    (["--url", "https://h.example/h", "--tenant", "nobody"], "unknown tenant(s): 'nobody'"),
    (["--url", "https://h.example/h"], "exactly one of --tenant T or --global"),
    (["--url", "https://h.example/h", "--tenant", "acme", "--global"], "exactly one of"),
])
def test_bad_endpoints_are_one_line_errors(hm: Any, with_tenants: dict[str, int],
                                           secret_file: Path, args: list[str],
                                           message: str) -> None:
    r = hm("webhooks", "add", *args, "--secret-file", str(secret_file))
    assert r.exit_code == 2 and message in one_error(r)
    assert json.loads(hm("webhooks", "endpoints", "--format", "json").stdout) == []


def test_bad_secrets_are_one_line_errors(hm: Any, with_tenants: dict[str, int],
                                         tmp_path: Path, secret_file: Path) -> None:
    url = ["webhooks", "add", "--url", "https://h.example/h", "--tenant", "acme"]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        (hm(*url, "--secret-file", str(empty)), "the endpoint's secret is empty"),
        (hm(*url, "--secret-file", "-", input=""), "the endpoint's secret is empty"),
        (hm(*url, "--secret-file", str(tmp_path / "missing")), "cannot read the secret file"),
        (hm(*url, "--secret-env", "UNSET_HOOK_SECRET"), "'UNSET_HOOK_SECRET' is not set"),
        (hm(*url), "exactly one of --secret-file"),
        (hm(*url, "--secret-file", str(secret_file), "--secret-env", "X"), "exactly one of"),
    ]
    for result, message in cases:
        assert result.exit_code == 2 and message in one_error(result)
    # there is no option that takes the secret itself
    r = hm(*url, "--secret", SECRET)
    assert r.exit_code == 2 and "No such option" in r.output + r.stderr


def test_remove_gives_up_pending_deliveries(hm: Any, engine: Engine,
                                            with_tenants: dict[str, int],
                                            secret_file: Path) -> None:
    hm("webhooks", "add", "--url", "https://acme.example/h", "--tenant", "acme",
       "--secret-file", str(secret_file))
    enqueue(engine, with_tenants, "acme", "a", "b", now=datetime.now(UTC))
    r = hm("webhooks", "remove", "1")
    assert r.exit_code == 0 and "2 pending deliveries marked dead" in r.output
    failed = json.loads(hm("webhooks", "list", "--failed", "--format", "json").stdout)
    assert [(d["status"], d["last_error"]) for d in failed] == [("dead", "endpoint removed")] * 2
    assert "removed" in hm("webhooks", "endpoints").output
    again = hm("webhooks", "remove", "1")
    assert again.exit_code == 2 and "removed already" in one_error(again)
    redo = hm("webhooks", "redeliver", str(failed[0]["id"]))
    assert redo.exit_code == 2 and "endpoint was removed" in one_error(redo)
    assert hm("webhooks", "remove", "7").exit_code == 2


# --- dead, list --failed, redeliver, against a real receiver -----------------------------------


class Moving:
    """The test's time, read by the deliverer and by the receiver's signature check."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def unix(self) -> float:
        return self.now.timestamp()


@pytest.fixture
def moving() -> Moving:
    return Moving()


@pytest.fixture
def timed_receiver(moving: Moving) -> Iterator[Receiver]:
    with Receiver(SECRET, clock=moving.unix) as r:
        yield r


def test_dead_after_the_window_then_listed_and_redelivered(
        hm: Any, engine: Engine, with_tenants: dict[str, int], secret_file: Path,
        timed_receiver: Receiver, moving: Moving) -> None:
    receiver = timed_receiver
    assert hm("webhooks", "add", "--url", receiver.url, "--tenant", "acme", "--secret-file",
              str(secret_file)).exit_code == 0
    enqueue(engine, with_tenants, "acme", "t1", "t2", now=moving.now)
    receiver.answer_by_default(Respond(503, retry_after="1"))
    for _ in range(30):  # a 0.1-hour window: tried every Retry-After, i.e. every run
        result = deliver(engine, moving.now, webhook_retry_hours=0.1)
        if result.counts["pending"] == 0:
            break
        moving.now += timedelta(minutes=1)
    assert result.counts["pending"] == 0
    first, second = outbox.event_id("t1"), outbox.event_id("t2")
    failed = json.loads(hm("webhooks", "list", "--failed", "--format", "json").stdout)
    assert sorted(d["event_id"] for d in failed) == sorted([first, second])
    assert {(d["status"], d["last_status"], d["next_attempt_at"]) for d in failed} == {
        ("dead", 503, None)}
    table = hm("webhooks", "list", "--failed")
    assert "dead" in table.output and "HTTP 503" in table.output
    assert all(r.signature_valid for r in receiver.received)
    assert hm("webhooks", "list", "--status", "pending", "--format", "json").stdout.strip() == (
        "[]")

    receiver.answer_by_default(Respond(200))
    by_event = {d["event_id"]: d["id"] for d in failed}
    r = hm("webhooks", "redeliver", str(by_event[first]))
    assert r.exit_code == 0 and "queued again (was dead" in r.output
    moving.now = datetime.now(UTC) + timedelta(seconds=1)  # the CLI queued it at the wall clock
    assert deliver(engine, moving.now).counts["delivered"] == 1
    assert receiver.delivered_ids() == [first]
    r = hm("webhooks", "redeliver", "--all-failed", "--tenant", "acme")
    assert r.exit_code == 0 and str(by_event[second]) in r.output
    moving.now = datetime.now(UTC) + timedelta(seconds=1)
    assert deliver(engine, moving.now).counts["delivered"] == 1
    assert receiver.delivered_ids() == [first, second]
    # the same event id and body as every earlier attempt
    bodies = {r.event_id: {x.body for x in receiver.received if x.event_id == r.event_id}
              for r in receiver.received}
    assert all(len(b) == 1 for b in bodies.values())
    delivered = json.loads(hm("webhooks", "list", "--status", "delivered", "--format",
                              "json").stdout)
    assert sorted(d["event_id"] for d in delivered) == sorted([first, second])
    assert hm("webhooks", "list", "--failed").output.startswith("no failed")
    # a delivered one may be sent again too (receivers dedupe on the id)
    r = hm("webhooks", "redeliver", str(by_event[first]))
    assert "was delivered" in r.output


@pytest.mark.parametrize(("args", "message"), [
    (["999"], "no webhook delivery 999"),
    ([], "give delivery IDs or --all-failed"),
    (["1", "--all-failed"], "give delivery IDs or --all-failed"),
    (["1", "--tenant", "acme"], "--tenant goes with --all-failed"),
    (["--all-failed", "--tenant", "nobody"], "unknown tenant(s): 'nobody'"),
])
def test_redeliver_refuses_what_it_cannot_do(hm: Any, with_tenants: dict[str, int],
                                              args: list[str], message: str) -> None:
    r = hm("webhooks", "redeliver", *args)
    assert r.exit_code == 2 and message in one_error(r)


def test_list_filters(hm: Any, with_tenants: dict[str, int]) -> None:
    r = hm("webhooks", "list", "--failed", "--status", "pending")
    assert r.exit_code == 2 and "--failed means --status dead" in one_error(r)
    r = hm("webhooks", "list", "--tenant", "nobody")
    assert r.exit_code == 2 and "unknown tenant" in one_error(r)
    assert hm("webhooks", "list").output.startswith("no webhook deliveries")


# --- the whole flow through `hostmeter run`, and the secret nowhere ----------------------------


def test_the_secret_is_in_no_output_and_no_log_file(
        hm: Any, engine: Engine, with_tenants: dict[str, int], secret_file: Path,
        receiver: Receiver, tmp_path: Path) -> None:
    outputs = [hm("webhooks", "add", "--url", receiver.url, "--global", "--secret-file",
                  str(secret_file))]
    enqueue(engine, with_tenants, "acme", "x1", "x2", now=datetime.now(UTC))
    enqueue(engine, with_tenants, "globex", "y1", now=datetime.now(UTC))
    receiver.script(Respond(500), Respond(404))
    at = datetime.now(UTC).replace(second=0, microsecond=0).isoformat()
    run = hm("run", "deliver-webhooks", "--at", at, "--format", "json")
    assert run.exit_code == 0, run.output
    counts = json.loads(run.stdout)["counts"]
    assert counts["attempts"] >= 2 and counts["dead"] == 1 and counts["retried"] == 1
    outputs += [run, hm("webhooks", "endpoints"), hm("webhooks", "endpoints", "--format", "json"),
                hm("webhooks", "list", "--format", "json"), hm("webhooks", "list"),
                hm("webhooks", "list", "--failed")]
    dead = json.loads(outputs[-3].stdout)
    outputs.append(hm("webhooks", "redeliver", "--all-failed"))
    assert "queued again" in outputs[-1].output
    for result in outputs:
        assert SECRET not in output(result)
    logs = list((tmp_path / "logs").glob("*"))
    assert logs, "the CLI wrote no log file"
    text = "".join(p.read_text() for p in logs)
    assert "webhook_attempt_failed" in text and "webhook_redelivery_queued" in text
    assert SECRET not in text
    signatures = [r.headers[outbox.SIGNATURE_HEADER].split("v1=")[1] for r in receiver.received]
    assert signatures and not any(s in text for s in signatures)
    assert next(d for d in dead if d["status"] == "dead")["last_status"] == 404
