"""The Lambda handler's secrets (jobs.triggers.aws_lambda.resolve_secrets) and the whole Lambda
variant of aggregate-job-logs: database URL from Secrets Manager, Mackerel key from SSM, job logs
from CloudWatch Logs — boto3 against a real HTTP server on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from awsfake import DUMMY_ENV, FakeAws, serve

from jobs.monitoring.store import log_runs
from jobs.runtime.errors import AwsError
from jobs.runtime.ledger import job_runs
from jobs.runtime.logconfig import configure_logging
from jobs.triggers import aws_lambda as aws
from metering.errors import ConfigError

ARN = "arn:aws:secretsmanager:ap-northeast-1:123456789012:secret:hostmeter/db-AbCdEf"
PARAM = "/hostmeter/mackerel-api-key"
KEY = "mkr-key-do-not-log-1234"
GROUP = "/hostmeter/prod/jobs"


def test_references_become_settings() -> None:
    fake = FakeAws(parameters={PARAM: KEY}, secrets={ARN: "sqlite:///x.db"})
    env = {"HOSTMETER_DATABASE_URL_SECRET_ARN": ARN, "MACKEREL_API_KEY_SSM_PARAMETER": PARAM,
           "HOSTMETER_DATABASE_URL": "sqlite:///stale.db"}
    assert aws.resolve_secrets(env, fake.client) == ["HOSTMETER_DATABASE_URL",
                                                     "MACKEREL_API_KEY"]
    assert env["HOSTMETER_DATABASE_URL"] == "sqlite:///x.db"  # the reference wins
    assert env["MACKEREL_API_KEY"] == KEY
    assert ("GetParameter", {"Name": PARAM, "WithDecryption": True}) in fake.calls
    assert aws.resolve_secrets({"HOSTMETER_DATABASE_URL": "sqlite:///y.db"}, fake.client) == []


def test_both_kinds_of_reference_is_an_error() -> None:
    env = {"MACKEREL_API_KEY_SECRET_ARN": ARN, "MACKEREL_API_KEY_SSM_PARAMETER": PARAM}
    with pytest.raises(ConfigError, match="set MACKEREL_API_KEY_SECRET_ARN or "
                                          "MACKEREL_API_KEY_SSM_PARAMETER, not both"):
        aws.resolve_secrets(env, FakeAws().client)


def test_a_missing_secret_is_one_line_and_changes_nothing() -> None:
    fake = FakeAws(secrets={ARN: "sqlite:///x.db"})
    env = {"HOSTMETER_DATABASE_URL_SECRET_ARN": ARN, "MACKEREL_API_KEY_SSM_PARAMETER": PARAM}
    with pytest.raises(AwsError) as caught:
        aws.resolve_secrets(env, fake.client)
    message = str(caught.value)
    assert message.startswith(f"MACKEREL_API_KEY: cannot read {PARAM} from ssm: ")
    assert "ParameterNotFound" in message and "\n" not in message
    assert "MACKEREL_API_KEY" not in env


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAws]:
    """AWS behind a local server; the function configured as infra/aws/hostmeter.yaml does."""
    fake = FakeAws(parameters={PARAM: KEY})
    with serve(fake) as url:
        for name, value in {
            **DUMMY_ENV,
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": url, "AWS_ENDPOINT_URL_SSM": url,
            "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": url, "MACKEREL_API_BASE": url,
            "HOSTMETER_DATABASE_URL_SECRET_ARN": ARN, "MACKEREL_API_KEY_SSM_PARAMETER": PARAM,
            "HOSTMETER_LOG_GROUPS": GROUP, "HOSTMETER_LOG_DIR": "",
        }.items():
            monkeypatch.setenv(name, value)
        for name in aws.SECRET_SETTINGS:  # the handler sets them; undone after the test
            monkeypatch.setenv(name, "")
        aws._reset_for_tests()
        try:
            yield fake
        finally:
            aws._reset_for_tests()
            configure_logging(None, stream=io.StringIO())


def finished(run_id: str, at: datetime) -> str:
    return json.dumps({"event": "job_finished", "level": "info", "timestamp": at.isoformat(),
                       "job": "snapshot-usage", "run_id": run_id, "status": "succeeded",
                       "logical_time": at.isoformat(), "duration_s": 2.0, "hours": 1})


def rows(url: str, table: sa.Table, column: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(conn.scalars(sa.select(table.c[column])))
    finally:
        engine.dispose()


def event(minutes_ago: int) -> dict[str, str]:
    at = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=minutes_ago)
    return {"job": "aggregate-job-logs", "scheduled_time": at.isoformat()}


def test_the_lambda_aggregates_ecs_logs_and_exports_with_the_ssm_key(
        lambda_env: FakeAws, db_url: str, empty_db_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake = lambda_env
    fake.secrets[ARN] = db_url
    at = datetime.now(UTC) - timedelta(minutes=20)
    fake.put(GROUP, finished("ecs-1", at), timestamp=int(at.timestamp() * 1000),
             ingested=int(at.timestamp() * 1000) + 2000)

    out = aws.handler(event(10), None)
    assert out["status"] == "succeeded" and out["counts"]["log_groups"] == 1
    assert rows(db_url, log_runs, "run_id") == ["ecs-1"]
    assert fake.mackerel and {api_key for _, api_key, _ in fake.mackerel} == {KEY}
    assert any(path == "/api/v0/services/hostmeter/tsdb" for path, _, _ in fake.mackerel)
    assert KEY not in capsys.readouterr().err  # fetched, used, never logged

    # the secret is rotated to another database: the next invocation uses it
    fake.secrets[ARN] = empty_db_url
    again = aws.handler(event(5), None)
    assert again["status"] == "succeeded"
    assert list(aws._ENGINES) == [empty_db_url]  # the old engine was disposed
    assert len(rows(empty_db_url, job_runs, "run_id")) == 1
    assert len(rows(db_url, job_runs, "run_id")) == 1


def test_a_secret_that_cannot_be_read_fails_before_the_database(
        lambda_env: FakeAws, db_url: str) -> None:
    lambda_env.secrets.clear()  # the secret was deleted
    with pytest.raises(AwsError, match=f"HOSTMETER_DATABASE_URL: cannot read {ARN} from "
                                       "secretsmanager: ResourceNotFoundException: "):
        aws.handler(event(10), None)
    assert aws._ENGINES == {}
    assert rows(db_url, job_runs, "run_id") == []
