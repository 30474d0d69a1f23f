"""Parsing and validating one JSON Lines ingest record (schema version 1)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering.errors import InvalidRecord
from metering.records import (
    BYTE_LIMITS,
    EARLIEST,
    LATEST,
    AnomalyRole,
    HostPost,
    MonitorChange,
    PlanChange,
    Record,
    RoleMember,
    ServicePost,
    parse_line,
)

AT = "2026-10-15T10:03:00Z"
AT_UTC = datetime(2026, 10, 15, 10, 3, tzinfo=UTC)

VALID: dict[str, dict[str, Any]] = {
    "plan": {"type": "plan", "tenant": "acme", "plan": "standard", "at": AT},
    "host_post": {
        "type": "host_post",
        "tenant": "acme",
        "host": "h-1",
        "kind": "standard",
        "at": AT,
        "metrics": ["loadavg5", "cpu.user"],
    },
    "service_post": {
        "type": "service_post",
        "tenant": "acme",
        "service": "web",
        "at": AT,
        "metrics": ["req.count"],
    },
    "monitor": {
        "type": "monitor",
        "tenant": "acme",
        "monitor": "m-1",
        "at": AT,
        "state": "created",
    },
    "anomaly_role": {
        "type": "anomaly_role",
        "tenant": "acme",
        "role": "web:app",
        "at": AT,
        "enabled": True,
    },
    "role_member": {
        "type": "role_member",
        "tenant": "acme",
        "role": "web:app",
        "host": "h-1",
        "at": AT,
        "member": True,
    },
}


def line(base: str, **changes: Any) -> str:
    """A JSON line: the valid ``base`` record with fields replaced (``None`` drops a field)."""
    obj = {**VALID[base], **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not None})


# --- valid records ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            line("plan"), PlanChange(tenant="acme", plan="standard", at=AT_UTC), id="plan"
        ),
        pytest.param(
            line("plan", plan="free"),
            PlanChange(tenant="acme", plan="free", at=AT_UTC),
            id="plan-free",
        ),
        pytest.param(
            line("plan", plan="trial"),
            PlanChange(tenant="acme", plan="trial", at=AT_UTC),
            id="plan-trial",
        ),
        pytest.param(
            line("host_post"),
            HostPost(
                tenant="acme",
                host="h-1",
                kind="standard",
                at=AT_UTC,
                metrics=("loadavg5", "cpu.user"),
            ),
            id="host_post",
        ),
        pytest.param(
            line("host_post", kind="micro", metrics=["a", "a"]),
            HostPost(tenant="acme", host="h-1", kind="micro", at=AT_UTC, metrics=("a", "a")),
            id="host_post-micro",
        ),
        pytest.param(
            line("service_post"),
            ServicePost(tenant="acme", service="web", at=AT_UTC, metrics=("req.count",)),
            id="service_post",
        ),
        pytest.param(
            line("monitor"),
            MonitorChange(tenant="acme", monitor="m-1", at=AT_UTC, present=True),
            id="monitor-created",
        ),
        pytest.param(
            line("monitor", state="deleted"),
            MonitorChange(tenant="acme", monitor="m-1", at=AT_UTC, present=False),
            id="monitor-deleted",
        ),
        pytest.param(
            line("anomaly_role"),
            AnomalyRole(tenant="acme", role="web:app", at=AT_UTC, enabled=True),
            id="anomaly_role-enabled",
        ),
        pytest.param(
            line("anomaly_role", enabled=False),
            AnomalyRole(tenant="acme", role="web:app", at=AT_UTC, enabled=False),
            id="anomaly_role-disabled",
        ),
        pytest.param(
            line("role_member"),
            RoleMember(tenant="acme", role="web:app", host="h-1", at=AT_UTC, member=True),
            id="role_member-joined",
        ),
        pytest.param(
            line("role_member", member=False),
            RoleMember(tenant="acme", role="web:app", host="h-1", at=AT_UTC, member=False),
            id="role_member-left",
        ),
        pytest.param(
            line("plan", v=1),
            PlanChange(tenant="acme", plan="standard", at=AT_UTC),
            id="explicit-schema-version-1",
        ),
        pytest.param(
            line("host_post", status="poweroff", retired=True, extra={"x": [1]}),
            HostPost(
                tenant="acme",
                host="h-1",
                kind="standard",
                at=AT_UTC,
                metrics=("loadavg5", "cpu.user"),
            ),
            id="unknown-fields-ignored",
        ),
        pytest.param(
            line("plan").encode() + b"\r\n",
            PlanChange(tenant="acme", plan="standard", at=AT_UTC),
            id="utf8-bytes-with-crlf",
        ),
        pytest.param(
            line("host_post", host="ホスト-1"),
            HostPost(
                tenant="acme",
                host="ホスト-1",
                kind="standard",
                at=AT_UTC,
                metrics=("loadavg5", "cpu.user"),
            ),
            id="non-ascii-name",
        ),
    ],
)
def test_valid_records(text: str | bytes, expected: Record) -> None:
    assert parse_line(text, line=1) == expected


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        ("2026-10-15T00:00:00+09:00", datetime(2026, 10, 14, 15, 0, tzinfo=UTC)),
        ("2026-10-15T10:45:00+05:30", datetime(2026, 10, 15, 5, 15, tzinfo=UTC)),
        ("2026-10-15T10:03:00-07:00", datetime(2026, 10, 15, 17, 3, tzinfo=UTC)),
        ("2026-10-15T10:03:00+00:00", AT_UTC),
        ("2026-10-15T10:59:59.999Z", datetime(2026, 10, 15, 10, 59, 59, 999000, tzinfo=UTC)),
    ],
)
def test_at_is_normalised_to_utc(at: str, expected: datetime) -> None:
    rec = parse_line(line("plan", at=at), line=1)
    assert isinstance(rec, PlanChange)
    assert rec.at == expected
    assert rec.at.tzinfo is UTC  # not merely an equal instant in another zone


@pytest.mark.parametrize("text", ["", "\n", "   \t \r\n", b"", b"\n", b"  \r\n"])
def test_blank_line_is_none(text: str | bytes) -> None:
    assert parse_line(text, line=3) is None


# --- invalid records -------------------------------------------------------------------------

INVALID = [
    # (text, field, fragments the message must contain)
    pytest.param(
        line("plan", type="host"),
        "type",
        ["'host'", "expected one of plan, host_post, service_post"],
        id="unknown-type",
    ),
    pytest.param(
        line("plan", type=None), "type", ["missing", "expected one of plan"], id="missing-type"
    ),
    pytest.param(
        line("plan", type=["plan"]),
        "type",
        ["['plan']", "expected one of plan"],
        id="type-is-a-list",
    ),
    pytest.param(
        line("plan", type={"name": "plan"}),
        "type",
        ["expected one of plan"],
        id="type-is-an-object",
    ),
    pytest.param(
        line("host_post", kind="large"),
        "kind",
        ["'large'", "expected one of standard, micro"],
        id="bad-kind",
    ),
    pytest.param(
        line("host_post", kind=None),
        "kind",
        ["missing", "expected one of standard"],
        id="missing-kind",
    ),
    pytest.param(
        line("host_post", at="yesterday"),
        "at",
        ["'yesterday'", "not an ISO 8601 instant", "expected e.g."],
        id="at-not-iso",
    ),
    pytest.param(
        line("host_post", at="2026-10-15T10:03:00"),
        "at",
        ["no UTC offset", "expected e.g."],
        id="at-without-offset",
    ),
    pytest.param(line("host_post", at="2026-10-15"), "at", ["no UTC offset"], id="at-date-only"),
    pytest.param(
        line("host_post", at=1760522580), "at", ["ISO 8601 string with an offset"], id="at-a-number"
    ),
    pytest.param(
        line("host_post", at=None),
        "at",
        ["missing", "expected an ISO 8601 instant"],
        id="missing-at",
    ),
    pytest.param(
        line("host_post", tenant=None),
        "tenant",
        ["missing", "'tenant'", "expected a non-empty string"],
        id="missing-tenant",
    ),
    pytest.param(line("host_post", tenant=""), "tenant", ["non-empty string"], id="empty-tenant"),
    pytest.param(line("plan", tenant="   "), "tenant", ["non-empty string"], id="blank-tenant"),
    pytest.param(
        line("plan", tenant=42), "tenant", ["non-empty string", "42"], id="tenant-a-number"
    ),
    pytest.param(
        line("plan", tenant="t" * 201),
        "tenant",
        ["201 bytes", "at most 200"],
        id="tenant-too-long",
    ),
    pytest.param(line("host_post", host=None), "host", ["missing", "'host'"], id="missing-host"),
    pytest.param(
        line("service_post", service=""), "service", ["non-empty string"], id="empty-service"
    ),
    pytest.param(
        line("host_post", metrics=[]),
        "metrics",
        ["empty", "expected a non-empty list of metric names"],
        id="empty-metrics",
    ),
    pytest.param(
        line("host_post", metrics="cpu.user"),
        "metrics",
        ["'cpu.user'", "expected a non-empty list"],
        id="metrics-not-a-list",
    ),
    pytest.param(
        line("service_post", metrics={"req.count": 1}),
        "metrics",
        ["expected a non-empty list"],
        id="metrics-an-object",
    ),
    pytest.param(
        line("host_post", metrics=None),
        "metrics",
        ["missing", "expected a non-empty"],
        id="missing-metrics",
    ),
    pytest.param(
        line("host_post", metrics=["cpu.user", 5]),
        "metrics",
        ["'metrics'[1]", "5", "expected a metric name"],
        id="metric-name-not-a-string",
    ),
    pytest.param(
        line("service_post", metrics=["a", ""]),
        "metrics",
        ["'metrics'[1]", "expected a metric name of 1 to 500 bytes"],
        id="empty-metric-name",
    ),
    pytest.param(
        line("host_post", metrics=["m" * 501]),
        "metrics",
        ["'metrics'[0]", "501 bytes", "1 to 500 bytes"],
        id="metric-name-too-long",
    ),
    pytest.param(
        line("monitor", state="paused"),
        "state",
        ["'paused'", "expected one of created, deleted"],
        id="bad-monitor-state",
    ),
    pytest.param(
        line("monitor", state=None),
        "state",
        ["missing", "created, deleted"],
        id="missing-monitor-state",
    ),
    pytest.param(
        line("anomaly_role", enabled="true"),
        "enabled",
        ["'true'", "expected true or false"],
        id="enabled-a-string",
    ),
    pytest.param(
        line("anomaly_role", enabled=1),
        "enabled",
        ["expected true or false"],
        id="enabled-a-number",
    ),
    pytest.param(
        line("anomaly_role", enabled=None),
        "enabled",
        ["missing", "true or false"],
        id="missing-enabled",
    ),
    pytest.param(
        line("role_member", member="yes"),
        "member",
        ["expected true or false"],
        id="member-not-a-boolean",
    ),
    pytest.param(
        line("plan", plan="enterprise"),
        "plan",
        ["'enterprise'", "expected one of free, trial, standard"],
        id="bad-plan",
    ),
    pytest.param(
        line("plan", plan="Standard"),
        "plan",
        ["expected one of free, trial"],
        id="plan-is-case-sensitive",
    ),
    pytest.param(line("plan", v=2), "v", ["2", "schema version 1"], id="schema-version-2"),
    pytest.param(
        line("plan", v="1"), "v", ["'1'", "schema version 1"], id="schema-version-a-string"
    ),
    pytest.param(line("plan", v=True), "v", ["True", "schema version 1"], id="schema-version-true"),
    # Text PostgreSQL cannot store (NUL) or that is not UTF-8 (a lone surrogate escape) must be
    # rejected here, not fail the whole ingest later inside the database driver.
    pytest.param(line("host_post", host="h\u00001"), "host", ["NUL"], id="nul-in-host"),
    pytest.param(line("plan", tenant="ac\u0000me"), "tenant", ["NUL"], id="nul-in-tenant"),
    pytest.param(
        line("host_post", metrics=["cpu\u0000"]),
        "metrics",
        ["'metrics'[0]", "without NUL"],
        id="nul-in-metric-name",
    ),
    pytest.param(
        line("host_post", host="h\ud8001"), "host", ["surrogate"], id="lone-surrogate-in-host"
    ),
    pytest.param(
        line("service_post", metrics=["ok", "req\udc00"]),
        "metrics",
        ["'metrics'[1]", "UTF-8"],
        id="lone-surrogate-in-metric-name",
    ),
    # Whole-line problems name no field.
    pytest.param(
        '{"type":"plan","tenant":"acme",', None, ["not valid JSON", "column"], id="invalid-json"
    ),
    pytest.param("{'type': 'plan'}", None, ["not valid JSON"], id="single-quoted-json"),
    pytest.param(
        json.dumps([VALID["plan"]]), None, ["expected a JSON object, got list"], id="json-array"
    ),
    pytest.param('"plan"', None, ["expected a JSON object, got str"], id="json-string"),
    pytest.param("null", None, ["expected a JSON object, got NoneType"], id="json-null"),
    pytest.param(
        b'{"type":"plan","tenant":"ac\xffme"}',
        None,
        ["not UTF-8 text", "byte 27"],
        id="non-utf8-bytes",
    ),
    pytest.param(line("plan").encode("utf-16"), None, ["not UTF-8 text"], id="utf16-bytes"),
]


@pytest.mark.parametrize(("text", "field", "fragments"), INVALID)
def test_invalid_records(text: str | bytes, field: str | None, fragments: list[str]) -> None:
    with pytest.raises(InvalidRecord) as info:
        parse_line(text, line=17)
    exc = info.value
    assert exc.line == 17
    assert exc.field == field
    assert str(exc).startswith("line 17: ")
    for fragment in fragments:
        assert fragment in exc.message, f"{fragment!r} not in {exc.message!r}"
    if field is not None:
        assert repr(field) in exc.message  # the message names the field it is about


# --- hostile lines: one InvalidRecord each, never another exception --------------------------

FOUR_BYTES = "\U0001f600"  # one character, four bytes of UTF-8


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


HOSTILE = [
    # (text, field, fragments the message must contain)
    pytest.param(
        '{"type":"plan","tenant":"acme","x":' + deep(1500) + "}",
        None,
        ["nested too deeply"],
        id="json-nested-1500-deep",
    ),
    pytest.param(
        '{"type":"plan","tenant":"acme","x":' + deep(100_000) + "}",
        None,
        ["nested too deeply"],
        id="json-nested-100000-deep",
    ),
    pytest.param(
        '{"type":"plan","tenant":"acme","plan":"free","at":"2026-10-15T00:00:00Z","n":'
        + "9" * 4301
        + "}",
        None,
        ["number", "4300 digits"],
        id="integer-of-4301-digits",
    ),
    pytest.param(
        line("plan", at="9999-12-31T23:30:00-05:00"), "at", ["out of range"], id="at-past-year-9999"
    ),
    pytest.param(
        line("plan", at="0001-01-01T00:30:00+05:00"), "at", ["out of range"], id="at-before-year-1"
    ),
    pytest.param(
        line("host_post", at="9999-06-01T00:00:00Z"),
        "at",
        ["out of range", "1970-01-01", "9999-01-01"],
        id="at-in-year-9999",
    ),
    pytest.param(
        line("host_post", at="1969-12-31T23:59:59Z"),
        "at",
        ["out of range", "1970-01-01"],
        id="at-before-1970",
    ),
    pytest.param(
        line("service_post", service=FOUR_BYTES * 64),
        "service",
        ["256 bytes", "at most 255"],
        id="service-of-64-four-byte-characters",
    ),
    pytest.param(
        line("service_post", service=FOUR_BYTES * 255, metrics=[FOUR_BYTES * 500]),
        "service",
        ["1020 bytes", "at most 255"],
        id="service-and-metric-that-overflow-a-postgresql-index-row",
    ),
    pytest.param(
        line("host_post", metrics=["ok", FOUR_BYTES * 126]),
        "metrics",
        ["'metrics'[1]", "504 bytes", "1 to 500 bytes"],
        id="metric-of-126-four-byte-characters",
    ),
    pytest.param(
        line("plan", tenant="é" * 101), "tenant", ["202 bytes", "at most 200"], id="tenant-in-bytes"
    ),
    pytest.param(
        line("monitor", monitor="ü" * 128), "monitor", ["256 bytes"], id="monitor-in-bytes"
    ),
    pytest.param(
        line("anomaly_role", role="ロ" * 86), "role", ["258 bytes"], id="role-in-bytes"
    ),
    pytest.param(
        line("role_member", host="ホ" * 86), "host", ["258 bytes"], id="member-host-in-bytes"
    ),
    pytest.param(
        '{"type":"plan","tenant":"\\ud800","plan":"free","at":"2026-10-15T00:00:00Z"}',
        "tenant",
        ["surrogate"],
        id="escaped-lone-surrogate",
    ),
    pytest.param(
        b'{"type":"plan","tenant":"ac\x00me","plan":"free","at":"2026-10-15T00:00:00Z"}',
        None,
        ["not valid JSON"],
        id="raw-nul-byte",
    ),
    pytest.param(
        '{"type":"plan","tenant":"acme","plan":"free","at":"2026-10-15T00:00:00Z"}\x00',
        None,
        ["not valid JSON"],
        id="nul-after-the-object",
    ),
    pytest.param("42", None, ["expected a JSON object, got int"], id="json-number"),
    pytest.param("true", None, ["expected a JSON object, got bool"], id="json-true"),
    pytest.param(
        b"\xef\xbb\xbf" + line("plan").encode(),
        None,
        ["byte order mark"],
        id="bom-on-a-line-that-is-not-the-first",
    ),
    pytest.param(
        line("plan", tenant=["x" * 1000] * 500),
        "tenant",
        ["non-empty string"],
        id="huge-list-as-tenant",
    ),
    pytest.param(
        line("plan", v=10**4000), "v", ["schema version 1"], id="huge-schema-version"
    ),
    pytest.param(
        line("plan", type="x" * 100_000), "type", ["expected one of plan"], id="huge-type"
    ),
    pytest.param(
        line("host_post", at="2026-10-15T10:03:00Z" + " " * 100_000),
        "at",
        ["not an ISO 8601 instant"],
        id="huge-at",
    ),
    pytest.param(
        '{"type":"plan","tenant":"acme","plan":"free","at":"2026-10-15T00:00:00Z","pad":"'
        + "x" * (1 << 20)
        + '"}',
        None,
        ["longer than 1048576 bytes"],
        id="line-over-1-mib",
    ),
]


@pytest.mark.parametrize(("text", "field", "fragments"), HOSTILE)
def test_hostile_lines_are_one_invalid_record(
    text: str | bytes, field: str | None, fragments: list[str]
) -> None:
    """Each is one rejected line (never RecursionError, ValueError, OverflowError…), and its
    message is one line of sane length that names the line and the field."""
    with pytest.raises(InvalidRecord) as info:
        parse_line(text, line=9)
    exc = info.value
    assert (exc.line, exc.field) == (9, field)
    assert str(exc).startswith("line 9: ")
    for fragment in fragments:
        assert fragment in exc.message, f"{fragment!r} not in {exc.message!r}"
    assert "\n" not in str(exc) and "\r" not in str(exc)
    assert len(str(exc)) <= 400, str(exc)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"tenant": FOUR_BYTES * 50}, "tenant"),  # 200 bytes
        ({"host": FOUR_BYTES * 63 + "abc"}, "host"),  # 255 bytes
        ({"metrics": [FOUR_BYTES * 125]}, "metrics"),  # 500 bytes
    ],
)
def test_names_at_their_byte_limit_are_accepted(changes: dict[str, Any], field: str) -> None:
    rec = parse_line(line("host_post", **changes), line=1)
    assert isinstance(rec, HostPost)
    value = getattr(rec, field)
    assert value == (tuple(changes[field]) if field == "metrics" else changes[field])


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        ("1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=UTC)),
        ("1970-01-01T09:00:00+09:00", datetime(1970, 1, 1, tzinfo=UTC)),
        ("9998-12-31T23:59:59.999999Z", datetime(9998, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_instants_at_the_ends_of_the_range_are_accepted(at: str, expected: datetime) -> None:
    rec = parse_line(line("plan", at=at), line=1)
    assert isinstance(rec, PlanChange) and rec.at == expected


def test_a_bad_value_is_shown_cut_short() -> None:
    with pytest.raises(InvalidRecord) as info:
        parse_line(line("host_post", kind="k" * 10_000), line=1)
    assert "'kkkk" in info.value.message
    assert "10000 characters" in info.value.message
    assert len(info.value.message) < 200


# --- property: any line is a record or one InvalidRecord ---------------------------------------

_NAMES = st.one_of(
    st.sampled_from(["acme", "h-1", "web", "cpu.user", "ホスト", "", " ", "\x00", "a\x00b"]),
    st.text(max_size=12),
    st.text(st.characters(codec="utf-8"), min_size=40, max_size=140),  # near the byte limits
    st.builds(lambda n, c: c * n, st.integers(45, 130), st.sampled_from(["\U0001f600", "é", "x"])),
    st.builds(lambda s, c: s + c, st.text(max_size=4), st.characters(categories=["Cs"])),
)
_INSTANTS = st.one_of(
    st.sampled_from(["2026-10-15T10:03:00Z", "9999-12-31T23:30:00-05:00",
                     "0001-01-01T00:30:00+05:00", "1969-12-31T23:59:59Z", "1970-01-01T00:00:00Z",
                     "9998-12-31T23:59:59.999999Z", "9999-01-01T00:00:00Z", "2026-10-15T10:03:00",
                     "2026-13-01T00:00:00Z", ""]),
    st.builds(lambda d: d.isoformat(),
              st.datetimes(timezones=st.timezones() | st.none(), allow_imaginary=True)),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=6,
)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from([*VALID, "host", ""]) | _JSON,
    "tenant": _NAMES | _JSON, "host": _NAMES | _JSON, "service": _NAMES | _JSON,
    "monitor": _NAMES | _JSON, "role": _NAMES | _JSON,
    "metrics": st.lists(_NAMES, max_size=4) | _JSON,
    "at": _INSTANTS | _JSON,
    "kind": st.sampled_from(["standard", "micro", "large"]) | _JSON,
    "plan": st.sampled_from(["free", "trial", "standard", "gold"]) | _JSON,
    "state": st.sampled_from(["created", "deleted", "paused"]) | _JSON,
    "enabled": st.booleans() | _JSON, "member": st.booleans() | _JSON,
    "v": st.sampled_from([1, 2, True, "1"]) | st.integers(),
}


@st.composite
def _record_like(draw: st.DrawFn) -> dict[str, Any]:
    """A valid record with some fields replaced, dropped or added."""
    obj = dict(VALID[draw(st.sampled_from(sorted(VALID)))])
    for name in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=3, unique=True)):
        if draw(st.booleans()):
            obj[name] = draw(_FIELDS[name])
        else:
            obj.pop(name, None)
    return obj


def _encode(obj: Any, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate written raw gives bytes that are not UTF-8
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


_LINES = st.one_of(
    st.builds(_encode, _record_like(), st.booleans()),
    st.builds(_encode, _JSON, st.booleans()),
    st.binary(max_size=200),
    # a valid line damaged: cut, with bytes inserted, or wrapped
    st.builds(lambda b, i, junk: b[:i] + junk + b[i:],
              st.builds(_encode, _record_like(), st.just(False)), st.integers(0, 200),
              st.binary(min_size=1, max_size=4)),
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(900, 3000)),
    st.builds(lambda n: b'{"type":"plan","x":' + b"7" * n + b"}", st.integers(4200, 4400)),
    st.builds(lambda b: b"\xef\xbb\xbf" + b, st.builds(_encode, _record_like(), st.just(True))),
)


def _storable_within(value: str, limit: int) -> bool:
    return "\x00" not in value and value.strip() != "" and len(value.encode("utf-8")) <= limit


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_LINES)
def test_any_line_is_a_record_or_one_invalid_record(text: bytes) -> None:
    try:
        rec = parse_line(text, line=5)
    except InvalidRecord as exc:
        assert exc.line == 5
        assert str(exc).startswith("line 5: ")
        assert "\n" not in str(exc) and "\r" not in str(exc)
        assert len(str(exc)) <= 400, str(exc)
        return
    if rec is None:
        assert not text.decode("utf-8").strip()
        return
    # What is accepted is storable on every backend.
    for name, limit in BYTE_LIMITS.items():
        value = getattr(rec, name, None)
        for item in value if isinstance(value, tuple) else [value] if value is not None else []:
            assert _storable_within(item, limit), (name, item)
    assert rec.at.tzinfo is UTC and EARLIEST <= rec.at < LATEST
