"""Ingest against hostile input on a real database (SQLite and PostgreSQL): poison lines are
rejected one line at a time, every value ingest accepts can be stored on both backends, every
bad line is reported, and memory stays flat however many distinct hosts a file holds."""

from __future__ import annotations

import gc
import json
import random
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from metering import ingest, records
from metering import models as m
from metering.errors import InvalidBatch, InvalidRecord
from metering.ingest import KEEP_ERRORS, ingest_lines

FOUR_BYTES = "\U0001f600"  # one character, four bytes of UTF-8
AT = "2026-10-15T10:03:00Z"


def _line(**fields: Any) -> str:
    return json.dumps(fields)


def host(tenant: str, name: str, metrics: list[str], at: str = AT, kind: str = "standard") -> str:
    return _line(type="host_post", tenant=tenant, host=name, kind=kind, at=at, metrics=metrics)


def service(tenant: str, name: str, metrics: list[str], at: str = AT) -> str:
    return _line(type="service_post", tenant=tenant, service=name, at=at, metrics=metrics)


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def random_text(rng: random.Random, size: int) -> str:
    """``size`` bytes of UTF-8 that no compression shrinks (PostgreSQL compresses long index
    values): random four-byte characters, then one-byte ones for the rest."""
    return "".join(chr(rng.randrange(0x10000, 0x110000)) for _ in range(size // 4)) + "x" * (
        size % 4
    )


_RNG = random.Random(3056)


# Each of these crashed a whole load (a traceback, and with --skip-invalid the good lines lost),
# or was accepted by SQLite and broke PostgreSQL.
POISON: dict[str, bytes] = {
    "nested-1500-deep": ('{"type":"plan","x":' + deep(1500) + "}").encode(),
    "integer-of-4301-digits": ('{"type":"plan","x":' + "9" * 4301 + "}").encode(),
    "at-past-9999": host("acme", "h-1", ["a"], at="9999-12-31T23:30:00-05:00").encode(),
    "at-before-year-1": host("acme", "h-1", ["a"], at="0001-01-01T00:30:00+05:00").encode(),
    # Within the old character limits, but 3,056 bytes in PostgreSQL's index on metric_names.
    "index-row-too-big": service(
        "acme", random_text(_RNG, 4 * 255), [random_text(_RNG, 4 * 500)]
    ).encode(),
    "tenant-of-4-byte-characters": host(FOUR_BYTES * 51, "h-1", ["a"]).encode(),
    "raw-nul": b'{"type":"plan","tenant":"a\x00","plan":"free","at":"2026-10-15T00:00:00Z"}',
    "escaped-lone-surrogate": b'{"type":"plan","tenant":"\\ud800","plan":"free","at":"'
    + AT.encode()
    + b'"}',
    "not-an-object": b"[1, 2, 3]",
    "not-utf-8": b'{"type":"plan","tenant":"\xff\xfe"}',
    "line-over-1-mib": ('{"type":"plan","pad":"' + "x" * (1 << 20) + '"}').encode(),
    "bom-not-at-the-start": b"\xef\xbb\xbf" + host("acme", "h-1", ["a"]).encode(),
}

GOOD = [
    host("acme", "h-1", ["a", "b"]),
    host("acme", "h-2", ["b", "c"], kind="micro"),
    service("acme", "web", ["req.count"]),
    _line(type="plan", tenant="acme", plan="standard", at="2026-10-01T00:00:00Z"),
    _line(type="monitor", tenant="globex", monitor="m-1", at=AT, state="created"),
    _line(type="anomaly_role", tenant="globex", role="web:app", at=AT, enabled=True),
    _line(type="role_member", tenant="globex", role="web:app", host="h-9", at=AT, member=True),
]


# --- reading the database back by natural keys ------------------------------------------------

METERING_TABLES = [t for t in (getattr(m, n) for n in m.__all__) if isinstance(t, sa.Table)]


def natural_dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every recorded row, with surrogate ids replaced by the keys they stand for, sorted:
    two databases that recorded the same usage give equal dumps whatever ids they assigned."""
    with engine.connect() as conn:
        tenant = {i: k for i, k in conn.execute(sa.select(m.tenants.c.id, m.tenants.c.key))}
        host_of = {
            i: (tenant[t], k)
            for i, t, k in conn.execute(sa.select(m.hosts.c.id, m.hosts.c.tenant_id, m.hosts.c.key))
        }

        def rows(table: sa.Table, *convert: Any) -> list[tuple[Any, ...]]:
            out = []
            for row in conn.execute(sa.select(table)):
                out.append(tuple(f(v) if f else v for f, v in zip(convert, row, strict=True)))
            return sorted(out, key=repr)

        t, h, b = tenant.__getitem__, host_of.__getitem__, bytes
        return {
            "tenants": sorted(tenant.values()),
            "hosts": sorted(host_of.values()),
            "metric_names": rows(m.metric_names, t, None, None, None),
            "host_hours": rows(m.host_hours, h, None, t, None, None, b),
            "service_hours": rows(m.service_hours, t, None, None, b),
            "plan_changes": rows(m.plan_changes, t, None, None),
            "monitor_events": rows(m.monitor_events, t, None, None, None),
            "role_events": rows(m.role_events, t, None, None, None),
            "role_member_events": rows(m.role_member_events, t, None, h, None, None),
        }


def is_empty(engine: Engine) -> bool:
    with engine.connect() as conn:
        return all(
            conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() == 0
            for t in METERING_TABLES
        )


def reset(engine: Engine) -> None:
    """Empty every metering table (children first), so one database serves many examples."""
    order = [t for t in reversed(m.metadata.sorted_tables) if t in METERING_TABLES]
    with engine.begin() as conn:
        for table in order:
            conn.execute(sa.delete(table))


def good_only(engine: Engine, good: list[str | bytes]) -> dict[str, list[tuple[Any, ...]]]:
    """What ingesting only ``good`` into an empty database records."""
    reset(engine)
    ingest_lines(engine, good)
    return natural_dump(engine)


# --- poison lines ------------------------------------------------------------------------------


def test_poison_lines_are_rejected_lines_with_nothing_written(engine: Engine) -> None:
    lines: list[str | bytes] = []
    expected_lines = []
    for name, bad in POISON.items():
        lines += GOOD[:2]
        lines.append(bad)
        expected_lines.append((len(lines), name))
    with pytest.raises(InvalidBatch) as info:
        ingest_lines(engine, lines, batch_size=3)
    assert info.value.count == len(POISON)
    assert [e.line for e in info.value.errors] == [n for n, _ in expected_lines]
    assert is_empty(engine)


def test_poison_lines_are_skipped_and_exactly_the_good_lines_loaded(engine: Engine) -> None:
    lines: list[str | bytes] = []
    good: list[str | bytes] = []
    bad_at = []
    for i, bad in enumerate(POISON.values()):
        lines += GOOD[i % len(GOOD) :][:2]
        good += GOOD[i % len(GOOD) :][:2]
        lines.append(bad)
        bad_at.append(len(lines))
    summary = ingest_lines(engine, lines, skip_invalid=True, batch_size=3)
    assert summary.rejected == len(POISON)
    assert [e.line for e in summary.errors] == bad_at
    assert summary.records == len(good)
    loaded = natural_dump(engine)
    assert loaded["host_hours"], "the good lines were not loaded"
    assert loaded == good_only(engine, good)


def test_what_fits_the_old_character_limits_but_not_an_index_row_is_one_rejected_line(
    engine: Engine,
) -> None:
    """255 + 500 four-byte characters passed the old validation; PostgreSQL then refused the
    whole load (index row size 3056 exceeds btree version 4 maximum 2704)."""
    lines = [GOOD[0], POISON["index-row-too-big"].decode(), GOOD[2]]
    summary = ingest_lines(engine, lines, skip_invalid=True)
    assert (summary.records, summary.rejected) == (2, 1)
    assert (summary.errors[0].line, summary.errors[0].field) == (2, "service")
    assert "1020 bytes" in summary.errors[0].message
    assert len(natural_dump(engine)["host_hours"]) == 1


def test_the_largest_names_ingest_accepts_are_stored_on_every_backend(engine: Engine) -> None:
    """Every text field at its byte limit, incompressible, on every record type: what the parser
    accepts, both backends store (PostgreSQL's b-tree limit applies to the whole index row)."""
    limits = records.BYTE_LIMITS
    rng = random.Random(2704)
    tenant = random_text(rng, limits["tenant"])
    name = {f: random_text(rng, limits[f]) for f in ("host", "service", "monitor", "role")}
    metrics = [random_text(rng, limits["metrics"]) for _ in range(3)]
    lines = [
        host(tenant, name["host"], metrics),
        service(tenant, name["service"], metrics),
        _line(type="plan", tenant=tenant, plan="trial", at=AT),
        _line(type="monitor", tenant=tenant, monitor=name["monitor"], at=AT, state="created"),
        _line(type="anomaly_role", tenant=tenant, role=name["role"], at=AT, enabled=True),
        _line(type="role_member", tenant=tenant, role=name["role"], host=name["host"], at=AT,
              member=True),
    ]
    for text in lines:
        assert records.parse_line(text, line=1) is not None
    summary = ingest_lines(engine, lines)
    assert summary.records == len(lines)
    dump = natural_dump(engine)
    assert dump["tenants"] == [tenant]
    assert dump["hosts"] == [(tenant, name["host"])]
    assert {n for _, ns, n, _ in dump["metric_names"] if ns == "host"} == set(metrics)
    assert {n for _, ns, n, _ in dump["metric_names"] if ns == "service"} == {
        ingest.service_metric_key(name["service"], x) for x in metrics
    }
    assert [r[1] for r in dump["monitor_events"]] == [name["monitor"]]
    assert [r[1] for r in dump["role_events"]] == [name["role"]]


@pytest.mark.parametrize(
    ("field", "column"),
    [
        ("tenant", m.tenants.c.key),
        ("host", m.hosts.c.key),
        ("monitor", m.monitor_events.c.monitor),
        ("role", m.role_events.c.role),
        ("role", m.role_member_events.c.role),
        ("role", m.usage_snapshot_roles.c.role),
        ("metrics", m.metric_names.c.name),
    ],
)
def test_byte_limits_fit_the_columns(field: str, column: sa.Column[Any]) -> None:
    """A value of n bytes has at most n characters, so it fits a VARCHAR(n) on PostgreSQL; the
    service-metric dictionary name holds a service name and a metric name together."""
    length = column.type.length  # type: ignore[attr-defined]
    limit = records.BYTE_LIMITS[field]
    if column is m.metric_names.c.name:
        service_key = len(ingest.service_metric_key("s" * records.BYTE_LIMITS["service"],
                                                    "m" * records.BYTE_LIMITS["metrics"]))
        limit = max(limit, service_key)
    assert limit <= length


def test_read_lines_cuts_an_overlong_line_and_keeps_the_next_ones() -> None:
    import io

    limit = records.MAX_LINE_BYTES
    fits = b"{" + b" " * (limit - 3) + b"}\n"  # exactly the limit, line break included
    stream = io.BytesIO(b"a\n" + fits + b"x" * (5 * limit) + b"\n" + b"b\n" + b"last")
    got = list(ingest.read_lines(stream))
    assert [len(x) for x in got] == [2, limit, limit + 1, 2, 4]
    assert (got[0], got[3], got[4]) == (b"a\n", b"b\n", b"last")
    with pytest.raises(InvalidRecord, match="longer than"):
        records.parse_line(got[2], line=3)
    with pytest.raises(InvalidRecord, match="field 'type' is missing"):  # parsed, not cut
        records.parse_line(got[1], line=2)


# --- every bad line is reported ----------------------------------------------------------------


@pytest.mark.parametrize("skip_invalid", [False, True], ids=["reject", "skip-invalid"])
def test_every_bad_line_reaches_on_error_and_the_first_ones_are_kept(
    engine: Engine, skip_invalid: bool
) -> None:
    lines: list[str | bytes] = []
    for _ in range(45):
        lines += [GOOD[0], "{not json"]
    seen: list[InvalidRecord] = []
    try:
        summary = ingest_lines(engine, lines, skip_invalid=skip_invalid, on_error=seen.append)
        kept, count = summary.errors, summary.rejected
    except InvalidBatch as exc:
        assert not skip_invalid
        kept, count = exc.errors, exc.count
        assert exc.records == 45
    assert count == 45
    assert [e.line for e in seen] == list(range(2, 91, 2))
    assert [e.line for e in kept] == list(range(2, 2 * KEEP_ERRORS + 1, 2))


def test_a_byte_order_mark_at_the_start_is_not_an_error(engine: Engine) -> None:
    for first in (b"\xef\xbb\xbf" + GOOD[0].encode(), "\ufeff" + GOOD[0]):
        reset(engine)
        summary = ingest_lines(engine, [first, GOOD[1]])
        assert (summary.records, summary.rejected) == (2, 0)
        assert len(natural_dump(engine)["host_hours"]) == 2


# --- bounded memory, exact counts --------------------------------------------------------------


def _fleet(tenants: int, hosts: int) -> list[str]:
    rng = random.Random(5)
    lines = []
    for i in range(hosts):
        at = f"2026-10-15T{i % 7:02d}:{i % 60:02d}:00Z"
        lines.append(host(f"t{i % tenants}", f"h-{i}", rng.sample("abcdefgh", 3), at=at))
        j = i // 2  # a host seen before, posting again
        lines.append(host(f"t{j % tenants}", f"h-{j}", ["z"], at=at))
    lines += [service(f"t{i}", "web", ["r"], at="2026-10-16T00:00:00Z") for i in range(tenants)]
    return lines


@pytest.fixture
def tiny_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches and in-memory distinct sets far smaller than a batch's keys, so that every
    eviction and spill path runs."""
    for name in ("CACHE_KEYS", "CACHE_NAMES", "DISTINCT_IN_MEMORY", "FLUSH_KEYS"):
        monkeypatch.setattr(ingest, name, 7, raising=False)


def test_counts_stay_exact_when_caches_overflow(engine: Engine, tiny_caches: None) -> None:
    lines = _fleet(tenants=25, hosts=300)
    summary = ingest_lines(engine, lines, batch_size=50)
    assert summary.as_dict() | {"rows_written": None} == {
        "records": len(lines),
        "tenants": 25,
        "hosts": 300,
        "hours": 8,
        "rejected": 0,
        "rows_written": None,
    }
    loaded = natural_dump(engine)

    again = ingest_lines(engine, lines, batch_size=50)  # idempotent, and counted the same
    assert (again.tenants, again.hosts, again.hours, again.written_rows) == (25, 300, 8, 0)
    assert natural_dump(engine) == loaded

    with pytest.raises(InvalidBatch):  # spilled, then rolled back: the next load is unaffected
        ingest_lines(engine, [*lines, "{oops"], batch_size=50)
    assert natural_dump(engine) == loaded
    summary = ingest_lines(engine, lines[:100], batch_size=50)
    assert (summary.hosts, summary.tenants) == (50, 25)

    reset(engine)
    ingest.CACHE_KEYS = ingest.CACHE_NAMES = ingest.DISTINCT_IN_MEMORY = 10**9
    ingest.FLUSH_KEYS = 10**9
    ingest_lines(engine, lines)
    assert natural_dump(engine) == loaded  # the same rows as with unbounded caches


def _growth_in_blocks(engine: Engine, lines: list[str]) -> int:
    """How many more small objects (pymalloc blocks) were alive at the peak of an ingest than
    at its start, sampled every 50 lines (cheap, unlike tracemalloc).

    Garbage is collected before each sample, so that only live objects count: in a long test
    session a full collection is rare, and cycles the ingest already dropped could otherwise
    sit in the oldest generation and look like growth. The session's own objects are frozen
    first, so each collection walks only what the ingest made."""
    gc.collect()
    gc.freeze()
    try:
        start = peak = sys.getallocatedblocks()

        def sample(lineno: int) -> None:
            nonlocal peak
            if lineno % 50 == 0:
                gc.collect()
                peak = max(peak, sys.getallocatedblocks())

        ingest_lines(engine, lines, batch_size=250, on_progress=sample)
        return peak - start
    finally:
        gc.unfreeze()


def test_memory_does_not_grow_with_distinct_hosts(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two files of the same shape, one with five times the distinct hosts: the same peak
    (before, the summary and the id cache kept every host of the file: about four objects
    per host)."""
    for name in ("CACHE_KEYS", "DISTINCT_IN_MEMORY", "FAST_KEYS"):
        monkeypatch.setattr(ingest, name, 500, raising=False)

    def distinct(n: int, tenant: str) -> list[str]:
        return [host(tenant, f"host-number-{i:08d}", ["a", "b"]) for i in range(n)]

    _growth_in_blocks(engine, distinct(1000, "warm-up"))
    small = _growth_in_blocks(engine, distinct(2000, "small"))
    large = _growth_in_blocks(engine, distinct(10000, "large"))
    assert large < small * 1.5 + 1000, (small, large)


def test_the_earliest_instant_accepted_is_stored(engine: Engine) -> None:
    ingest_lines(engine, [host("acme", "h-1", ["a"], at="1970-01-01T09:00:00+09:00")])
    hours = [r[1] for r in natural_dump(engine)["host_hours"]]
    assert hours == [datetime(1970, 1, 1, tzinfo=UTC)]


# --- property: any mix of good and hostile lines ------------------------------------------------

_TENANTS = st.sampled_from(["acme", "globex", "ホスト社"])
_HOSTS = st.sampled_from(["h-1", "h-2", "db\U0001f600"])
_METRICS = st.lists(st.sampled_from(["a", "b", "cpu.user", "é", "x" * 500]), min_size=1,
                    max_size=4)
_ATS = st.sampled_from(["2026-10-15T10:03:00Z", "2026-10-15T10:59:59.999Z",
                        "2026-10-15T20:00:00+09:00", "2026-10-15T11:00:00Z"])
_GOOD_LINES = st.one_of(
    st.builds(lambda t, h, ms, at, k: host(t, h, ms, at=at, kind=k),
              _TENANTS, _HOSTS, _METRICS, _ATS, st.sampled_from(["standard", "micro"])),
    st.builds(lambda t, s, ms, at: service(t, s, ms, at=at),
              _TENANTS, st.sampled_from(["web", "api"]), _METRICS, _ATS),
    st.builds(lambda t, p, at: _line(type="plan", tenant=t, plan=p, at=at),
              _TENANTS, st.sampled_from(["free", "trial", "standard"]), _ATS),
    st.builds(lambda t, at, s: _line(type="monitor", tenant=t, monitor="m-1", at=at, state=s),
              _TENANTS, _ATS, st.sampled_from(["created", "deleted"])),
    st.builds(lambda t, at, e: _line(type="anomaly_role", tenant=t, role="web", at=at,
                                     enabled=e), _TENANTS, _ATS, st.booleans()),
    st.builds(lambda t, h, at, j: _line(type="role_member", tenant=t, role="web", host=h,
                                        at=at, member=j), _TENANTS, _HOSTS, _ATS, st.booleans()),
)
_TOO_LONG = {field: random_text(random.Random(field), limit + 4)
             for field, limit in records.BYTE_LIMITS.items()}


def _spoiled(text: str, field: str, value: Any) -> str:
    """A good line with one field made invalid, or as good when the record has no such field."""
    obj = json.loads(text)
    if field not in obj:
        obj["tenant"] = value if field in ("tenant", "at", "metrics") else ""
    else:
        obj[field] = value
    return json.dumps(obj)


_HOSTILE_LINES = st.one_of(
    st.sampled_from(sorted(v for k, v in POISON.items() if k != "line-over-1-mib")),
    st.builds(
        lambda text, field, value: _spoiled(text, field, value).encode(),
        _GOOD_LINES,
        st.sampled_from(["tenant", "host", "service", "monitor", "role"]),
        st.sampled_from(["", "a\x00b", "x\ud800", 7, None, ["h"]])
        | st.sampled_from(sorted(_TOO_LONG.values())),
    ),
    st.builds(lambda text, at: _spoiled(text, "at", at).encode(), _GOOD_LINES,
              st.sampled_from(["9999-12-31T23:30:00-05:00", "0001-01-01T00:30:00+05:00",
                               "1969-12-31T23:59:59Z", "2026-10-15T10:03:00", 1760522580])),
    st.builds(lambda text, ms: _spoiled(text, "metrics", ms).encode(), _GOOD_LINES,
              st.sampled_from([[], ["ok", ""], [_TOO_LONG["metrics"]], ["a\x00"], [["a"]]])),
    st.builds(lambda text, cut: text.encode()[:cut], _GOOD_LINES, st.integers(1, 30)),
    st.builds(lambda text, junk: text.encode() + junk, _GOOD_LINES,
              st.sampled_from([b"\xff", b"}", b"\x00", b",{}"])),
)


@st.composite
def _mixed_lines(draw: st.DrawFn) -> tuple[list[bytes], list[bool]]:
    """Lines, and for each whether it is good; blank lines are neither."""
    lines: list[bytes] = []
    good: list[bool] = []
    for kind in draw(st.lists(st.sampled_from(["good", "good", "hostile", "blank"]),
                              max_size=14)):
        if kind == "blank":
            lines.append(draw(st.sampled_from([b"", b"  ", b"\r\n"])))
        else:
            strategy = _GOOD_LINES.map(str.encode) if kind == "good" else _HOSTILE_LINES
            lines.append(draw(strategy))
        good.append(kind == "good")
    return lines, good


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(mixed=_mixed_lines(), batch_size=st.sampled_from([1, 3, 5000]))
def test_any_mix_is_rejected_whole_or_loads_exactly_its_good_lines(
    engine: Engine, mixed: tuple[list[bytes], list[bool]], batch_size: int
) -> None:
    """Without --skip-invalid: one bad line rejects the input and nothing is written. With it:
    the database holds what ingesting only the good lines into an empty one gives."""
    lines, good = mixed
    bad_at = [i for i, text in enumerate(lines, start=1) if not good[i - 1] and text.strip()]
    for i in bad_at:  # every hostile line is one invalid record, nothing else
        with pytest.raises(InvalidRecord):
            records.parse_line(lines[i - 1], line=i)

    reset(engine)
    if bad_at:
        with pytest.raises(InvalidBatch) as info:
            ingest_lines(engine, lines, batch_size=batch_size)
        assert info.value.count == len(bad_at)
        assert [e.line for e in info.value.errors] == bad_at[:KEEP_ERRORS]
        assert is_empty(engine)

    reset(engine)
    summary = ingest_lines(engine, lines, skip_invalid=True, batch_size=batch_size)
    assert summary.rejected == len(bad_at)
    assert summary.records == sum(good)
    loaded = natural_dump(engine)
    assert loaded == good_only(engine, [t for t, g in zip(lines, good, strict=True) if g])
