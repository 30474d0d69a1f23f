"""Ingest on a real database (SQLite and PostgreSQL): exact distinct counts, idempotency,
all-or-nothing batches, --skip-invalid, the summary, plan history and streaming."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from metering import models as m
from metering.errors import InvalidBatch
from metering.ingest import KEEP_ERRORS, ingest_lines

TABLES: list[sa.Table] = [
    t for t in (getattr(m, name) for name in m.__all__) if isinstance(t, sa.Table)
]
RECORDED = [
    "tenants",
    "hosts",
    "metric_names",
    "host_hours",
    "service_hours",
    "plan_changes",
    "monitor_events",
    "role_events",
    "role_member_events",
]


# --- record builders ---------------------------------------------------------------------------


def _line(**fields: Any) -> str:
    return json.dumps(fields)


def host(tenant: str, name: str, at: str, metrics: list[str], kind: str = "standard") -> str:
    return _line(type="host_post", tenant=tenant, host=name, kind=kind, at=at, metrics=metrics)


def service(tenant: str, name: str, at: str, metrics: list[str]) -> str:
    return _line(type="service_post", tenant=tenant, service=name, at=at, metrics=metrics)


def plan(tenant: str, name: str, at: str) -> str:
    return _line(type="plan", tenant=tenant, plan=name, at=at)


def monitor(tenant: str, name: str, at: str, state: str) -> str:
    return _line(type="monitor", tenant=tenant, monitor=name, at=at, state=state)


def role(tenant: str, name: str, at: str, enabled: bool) -> str:
    return _line(type="anomaly_role", tenant=tenant, role=name, at=at, enabled=enabled)


def member(tenant: str, name: str, host_key: str, at: str, joined: bool) -> str:
    return _line(type="role_member", tenant=tenant, role=name, host=host_key, at=at, member=joined)


BAD_KIND = host("acme", "h-x", "2026-10-15T10:00:00Z", ["a"], kind="large")


# --- reading the database back -----------------------------------------------------------------


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every metering table, sorted: equal dumps mean byte-identical tables."""
    with engine.connect() as conn:
        return {
            t.name: sorted((tuple(r) for r in conn.execute(sa.select(t))), key=repr) for t in TABLES
        }


def row_counts(engine: Engine) -> dict[str, int]:
    return {name: len(rows) for name, rows in dump(engine).items()}


def _decode(bits: bytes, dictionary: dict[int, str]) -> frozenset[str]:
    n = int.from_bytes(bits, "little")
    return frozenset(name for ordinal, name in dictionary.items() if n >> ordinal & 1)


def _dictionaries(conn: sa.Connection) -> dict[tuple[int, str], dict[int, str]]:
    out: dict[tuple[int, str], dict[int, str]] = {}
    for t, ns, name, ordinal in conn.execute(sa.select(m.metric_names)):
        out.setdefault((t, ns), {})[ordinal] = name
    return out


def host_hours(engine: Engine) -> dict[tuple[str, str, str], tuple[str, frozenset[str]]]:
    """``(tenant, host, hour) → (kind, metric names)``, decoded through the name dictionary."""
    h, t = m.host_hours, m.tenants
    q = (
        sa.select(
            t.c.key,
            m.hosts.c.key,
            h.c.hour,
            h.c.kind,
            h.c.metric_count,
            h.c.metric_bits,
            h.c.tenant_id,
        )
        .join(m.hosts, m.hosts.c.id == h.c.host_id)
        .join(t, t.c.id == m.hosts.c.tenant_id)
    )
    out = {}
    with engine.connect() as conn:
        names = _dictionaries(conn)
        for tenant, host_key, hour, kind, count, bits, tenant_id in conn.execute(q):
            metrics = _decode(bits, names.get((tenant_id, "host"), {}))
            assert count == len(metrics), "metric_count disagrees with the bitmap"
            out[(tenant, host_key, hour.strftime("%m-%dT%H"))] = (kind, metrics)
    return out


def service_hours(engine: Engine) -> dict[tuple[str, str], frozenset[str]]:
    """``(tenant, hour) → service metric names``."""
    s, t = m.service_hours, m.tenants
    q = sa.select(t.c.key, s.c.hour, s.c.metric_count, s.c.metric_bits, s.c.tenant_id).join(
        t, t.c.id == s.c.tenant_id
    )
    out = {}
    with engine.connect() as conn:
        names = _dictionaries(conn)
        for tenant, hour, count, bits, tenant_id in conn.execute(q):
            keys = _decode(bits, names.get((tenant_id, "service"), {}))
            assert count == len(keys), "metric_count disagrees with the bitmap"
            # dictionary names are "<len(service)>:<service>:<name>"; compare metric names
            out[(tenant, hour.strftime("%m-%dT%H"))] = frozenset(
                k.split(":", 1)[1][int(k.split(":", 1)[0]) + 1 :] for k in keys
            )
    return out


def plans(engine: Engine) -> list[tuple[str, datetime, str]]:
    q = sa.select(m.tenants.c.key, m.plan_changes.c.at, m.plan_changes.c.plan).join(
        m.tenants, m.tenants.c.id == m.plan_changes.c.tenant_id
    )
    with engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(q))  # type: ignore[misc]


# --- exact distinct counting -----------------------------------------------------------------

F = frozenset

COUNTING = [
    pytest.param(
        [
            host("acme", "h-1", "2026-10-15T10:03:00Z", ["a", "b", "c"]),
            host("acme", "h-1", "2026-10-15T10:20:00Z", ["b", "c", "d"]),
            host("acme", "h-1", "2026-10-15T10:59:00Z", ["a", "e"]),
        ],
        {("acme", "h-1", "10-15T10"): ("standard", F("abcde"))},
        {},
        id="overlapping-posts-in-one-hour",
    ),
    pytest.param(
        [
            host("acme", "h-1", "2026-10-15T10:03:00Z", ["a", "a", "b", "b", "b", "a"]),
            host("acme", "h-1", "2026-10-15T10:04:00Z", ["b", "b"]),
        ],
        {("acme", "h-1", "10-15T10"): ("standard", F("ab"))},
        {},
        id="duplicates-inside-a-post",
    ),
    pytest.param(
        [
            host("acme", "h-1", "2026-10-15T10:59:59.999Z", ["a", "b"]),
            host("acme", "h-1", "2026-10-15T11:00:00Z", ["c"]),
            host("acme", "h-1", "2026-10-15T10:00:00Z", ["d"]),
            service("acme", "web", "2026-10-15T10:59:59.999999Z", ["x"]),
            service("acme", "web", "2026-10-15T11:00:00Z", ["y"]),
        ],
        {
            ("acme", "h-1", "10-15T10"): ("standard", F("abd")),
            ("acme", "h-1", "10-15T11"): ("standard", F("c")),
        },
        {("acme", "10-15T10"): F("x"), ("acme", "10-15T11"): F("y")},
        id="hour-boundaries",
    ),
    pytest.param(
        [
            host("acme", "h-1", "2026-10-15T10:05:00Z", ["a", "b"]),
            host("acme", "h-1", "2026-10-15T11:05:00Z", ["b", "c"]),
            host("acme", "h-1", "2026-10-15T13:05:00Z", ["d"]),
            host("acme", "h-1", "2026-10-16T10:05:00Z", ["e"]),
        ],
        {
            ("acme", "h-1", "10-15T10"): ("standard", F("ab")),
            ("acme", "h-1", "10-15T11"): ("standard", F("bc")),
            ("acme", "h-1", "10-15T13"): ("standard", F("d")),
            ("acme", "h-1", "10-16T10"): ("standard", F("e")),
        },
        {},
        id="different-hours-do-not-mix",
    ),
    pytest.param(
        [
            host("acme", "h-1", "2026-10-15T10:30:00+09:00", ["a"]),  # 01:30 UTC
            host("acme", "h-1", "2026-10-15T01:59:00Z", ["b"]),
            host("acme", "h-1", "2026-10-15T10:30:00Z", ["c"]),
        ],
        {
            ("acme", "h-1", "10-15T01"): ("standard", F("ab")),
            ("acme", "h-1", "10-15T10"): ("standard", F("c")),
        },
        {},
        id="offsets-are-hours-in-utc",
    ),
    pytest.param(
        [
            host("acme", "h-1", "2026-10-15T10:03:00Z", ["a", "b"]),
            host("globex", "h-1", "2026-10-15T10:03:00Z", ["b", "c", "d"]),
            host("acme", "h-2", "2026-10-15T10:03:00Z", ["d"]),
        ],
        {
            ("acme", "h-1", "10-15T10"): ("standard", F("ab")),
            ("acme", "h-2", "10-15T10"): ("standard", F("d")),
            ("globex", "h-1", "10-15T10"): ("standard", F("bcd")),
        },
        {},
        id="same-host-name-under-two-tenants",
    ),
    pytest.param(
        [
            service("acme", "web", "2026-10-15T10:03:00Z", ["req.count", "req.err"]),
            service("acme", "db", "2026-10-15T10:10:00Z", ["req.count", "qps"]),
            service("acme", "web", "2026-10-15T10:50:00Z", ["req.err", "latency"]),
            service("globex", "web", "2026-10-15T10:03:00Z", ["req.count"]),
            host("acme", "h-1", "2026-10-15T10:03:00Z", ["req.count"]),
        ],
        {("acme", "h-1", "10-15T10"): ("standard", F({"req.count"}))},
        {
            ("acme", "10-15T10"): F({"req.count", "req.err", "qps", "latency"}),
            ("globex", "10-15T10"): F({"req.count"}),
        },
        id="service-metrics-distinct-per-tenant",
    ),
    pytest.param(
        [
            host("acme", "h-1", "2026-10-15T10:03:00Z", ["a"], kind="micro"),
            host("acme", "h-1", "2026-10-15T10:13:00Z", ["b"], kind="standard"),
            host("acme", "h-1", "2026-10-15T10:23:00Z", ["c"], kind="micro"),
            host("acme", "h-1", "2026-10-15T11:03:00Z", ["a"], kind="micro"),
            host("acme", "h-2", "2026-10-15T10:03:00Z", ["a"], kind="micro"),
            host("acme", "h-2", "2026-10-15T10:33:00Z", ["a"], kind="standard"),
        ],
        {
            ("acme", "h-1", "10-15T10"): ("standard", F("abc")),
            ("acme", "h-1", "10-15T11"): ("micro", F("a")),
            ("acme", "h-2", "10-15T10"): ("standard", F("a")),
        },
        {},
        id="standard-and-micro-in-one-hour-is-standard",
    ),
]


def as_tenants_of(prefix: str, lines: list[str]) -> list[str]:
    """The same records with every tenant renamed ``prefix/tenant``, so that several loads can
    share one database without seeing each other."""
    out = []
    for text in lines:
        obj = json.loads(text)
        out.append(json.dumps({**obj, "tenant": f"{prefix}/{obj['tenant']}"}))
    return out


def of_tenants_of(prefix: str, rows: dict[Any, Any]) -> dict[Any, Any]:
    """The rows of ``rows`` (keyed by tenant first) whose tenant was renamed by ``prefix``."""
    return {
        (key[0].removeprefix(f"{prefix}/"), *key[1:]): value
        for key, value in rows.items()
        if key[0].startswith(f"{prefix}/")
    }


def _one_ingest_per_line(engine: Engine, lines: list[str]) -> None:
    for text in lines:  # every merge goes through the stored bitmap and name dictionary
        ingest_lines(engine, [text])


LOADS: dict[str, Callable[[Engine, list[str]], object]] = {
    "one-batch": lambda engine, lines: ingest_lines(engine, lines),
    "batch-of-1": lambda engine, lines: ingest_lines(engine, lines, batch_size=1),
    "ingest-per-line": _one_ingest_per_line,
}


@pytest.mark.parametrize(("lines", "hosts", "services"), COUNTING)
def test_distinct_metric_counts(
    engine: Engine, lines: list[str], hosts: dict[Any, Any], services: dict[Any, Any]
) -> None:
    """Each case is loaded in each of the ways of :data:`LOADS`, under its own tenant names."""
    for how, load in LOADS.items():
        load(engine, as_tenants_of(how, lines))
    for how in LOADS:
        assert of_tenants_of(how, host_hours(engine)) == hosts, how
        assert of_tenants_of(how, service_hours(engine)) == services, how


def test_merging_spans_more_keys_than_one_look_up(engine: Engine) -> None:
    """450 tenants, hosts and service hours: more than one ``IN (...)`` chunk of each."""
    n = 450
    first = [host(f"t{i}", "h", "2026-10-15T10:03:00Z", ["a", f"x{i}"]) for i in range(n)]
    first += [service(f"t{i}", "web", "2026-10-15T10:03:00Z", ["r"]) for i in range(n)]
    second = [host(f"t{i}", "h", "2026-10-15T10:33:00Z", ["b", "a"]) for i in range(n)]
    second += [service(f"t{i}", "api", "2026-10-15T10:33:00Z", ["s"]) for i in range(n)]
    ingest_lines(engine, first)
    ingest_lines(engine, second)
    assert host_hours(engine) == {
        (f"t{i}", "h", "10-15T10"): ("standard", F({"a", "b", f"x{i}"})) for i in range(n)
    }
    assert service_hours(engine) == {(f"t{i}", "10-15T10"): F("rs") for i in range(n)}


# --- idempotency -----------------------------------------------------------------------------


def _fleet() -> list[str]:
    """A little of everything, over several tenants and hours, with overlaps and duplicates."""
    rng = random.Random(20261015)
    lines = []
    for t in ("acme", "globex", "initech"):
        lines.append(plan(t, "trial", "2026-10-01T00:00:00+09:00"))
        lines.append(plan(t, "standard", "2026-10-15T00:00:00+09:00"))
        for hour in (9, 10, 11):
            for h in range(4):
                for minute in (1, 31):
                    metrics = rng.sample([f"m{j}" for j in range(12)], 5)
                    kind = "micro" if h == 3 and minute == 1 else "standard"
                    at = f"2026-10-15T{hour:02d}:{minute:02d}:00Z"
                    lines.append(host(t, f"h-{h}", at, metrics, kind=kind))
            lines.append(service(t, "web", f"2026-10-15T{hour:02d}:05:00Z", ["req", f"s{hour}"]))
        lines.append(monitor(t, "m-1", "2026-10-15T09:00:00Z", "created"))
        lines.append(monitor(t, "m-1", "2026-10-15T11:30:00Z", "deleted"))
        lines.append(role(t, "web:app", "2026-10-01T00:00:00Z", True))
        lines.append(member(t, "web:app", "h-0", "2026-10-01T00:00:00Z", True))
        lines.append(member(t, "web:app", "h-9", "2026-10-01T00:00:00Z", True))
        lines.append(member(t, "web:app", "h-9", "2026-10-15T10:00:00Z", False))
    lines += lines[:7]  # duplicates inside the file
    return lines


def test_loading_the_same_records_again_changes_nothing(engine: Engine) -> None:
    lines = _fleet()
    ingest_lines(engine, lines)
    first = dump(engine)
    assert all(first[name] for name in RECORDED), {n: len(first[n]) for n in RECORDED}

    ingest_lines(engine, lines)
    assert dump(engine) == first

    # The same records again, split into two files, shuffled, in other batch boundaries.
    shuffled = lines[:]
    random.Random(7).shuffle(shuffled)
    half = len(shuffled) // 2
    ingest_lines(engine, shuffled[half:], batch_size=7)
    ingest_lines(engine, shuffled[:half], batch_size=13)
    assert dump(engine) == first


def test_loading_in_pieces_then_whole_changes_nothing(engine: Engine) -> None:
    lines = _fleet()
    shuffled = lines[:]
    random.Random(11).shuffle(shuffled)
    ingest_lines(engine, shuffled[::2], batch_size=5)
    ingest_lines(engine, shuffled[1::2], batch_size=5)
    pieces = dump(engine)
    assert all(pieces[name] for name in RECORDED)

    ingest_lines(engine, lines)
    assert dump(engine) == pieces


# --- all or nothing (the default) ------------------------------------------------------------


def _good(n: int, tenant: str = "acme") -> list[str]:
    return [host(tenant, f"h-{i}", "2026-10-15T10:03:00Z", ["a", f"m{i}"]) for i in range(n)]


def test_one_bad_line_rejects_the_file_and_writes_nothing(engine: Engine) -> None:
    lines = [*_good(3), BAD_KIND, *_good(3, tenant="globex")]
    with pytest.raises(InvalidBatch) as info:
        ingest_lines(engine, lines)
    exc = info.value
    assert exc.count == 1
    assert [(e.line, e.field) for e in exc.errors] == [(4, "kind")]
    assert "nothing was written" in str(exc)
    assert set(row_counts(engine).values()) == {0}


def test_a_bad_line_after_several_written_batches_still_writes_nothing(engine: Engine) -> None:
    lines = [*_good(25), "{not json", *_good(5, tenant="globex"), BAD_KIND, *_good(3)]
    inserts: list[str] = []

    def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            inserts.append(statement)

    sa.event.listen(engine, "before_cursor_execute", spy)
    try:
        with pytest.raises(InvalidBatch) as info:
            ingest_lines(engine, lines, batch_size=10, hold_keys=1)
    finally:
        sa.event.remove(engine, "before_cursor_execute", spy)
    assert any("host_hours" in s for s in inserts), "the good batches were never written"
    assert info.value.count == 2
    assert [(e.line, e.field) for e in info.value.errors] == [(26, None), (32, "kind")]
    assert set(row_counts(engine).values()) == {0}


def test_every_bad_line_is_counted_and_the_first_ones_are_kept(engine: Engine) -> None:
    lines: list[str] = []
    bad_lines = []
    for i in range(30):
        lines += _good(2)
        lines.append(BAD_KIND if i % 2 else '["a", "list"]')
        bad_lines.append(len(lines))
    with pytest.raises(InvalidBatch) as info:
        ingest_lines(engine, lines, batch_size=10)
    assert info.value.count == 30
    assert [e.line for e in info.value.errors] == bad_lines[:KEEP_ERRORS]
    assert set(row_counts(engine).values()) == {0}


# --- --skip-invalid --------------------------------------------------------------------------


def test_skip_invalid_loads_the_good_lines_and_reports_the_bad_ones(engine: Engine) -> None:
    lines = [
        host("acme", "h-1", "2026-10-15T10:03:00Z", ["a", "b"]),  # 1
        "{not json",  # 2
        host("acme", "h-1", "2026-10-15T10:13:00Z", ["c"]),  # 3
        BAD_KIND,  # 4
        "",  # 5 blank: not an error
        service("acme", "web", "2026-10-15T10:03:00Z", ["r"]),  # 6
        host("acme", "h\u00002", "2026-10-15T10:03:00Z", ["a"]),  # 7 NUL: PostgreSQL
        json.dumps({"type": ["host_post"]}),  # 8 unhashable type
        plan("acme", "gold", "2026-10-01T00:00:00Z"),  # 9
        host("globex", "h-1", "2026-10-15T10:03:00Z", ["z"]),  # 10
    ]
    summary = ingest_lines(engine, lines, skip_invalid=True, batch_size=2)
    assert summary.records == 4
    assert summary.rejected == 5
    assert [(e.line, e.field) for e in summary.errors] == [
        (2, None),
        (4, "kind"),
        (7, "host"),
        (8, "type"),
        (9, "plan"),
    ]
    assert host_hours(engine) == {
        ("acme", "h-1", "10-15T10"): ("standard", F("abc")),
        ("globex", "h-1", "10-15T10"): ("standard", F("z")),
    }
    assert service_hours(engine) == {("acme", "10-15T10"): F("r")}
    assert plans(engine) == []


def test_skip_invalid_keeps_the_first_errors_but_counts_all(engine: Engine) -> None:
    lines = [BAD_KIND] * 30 + _good(1)
    summary = ingest_lines(engine, lines, skip_invalid=True)
    assert summary.rejected == 30
    assert [e.line for e in summary.errors] == list(range(1, KEEP_ERRORS + 1))
    assert summary.records == 1
    assert len(host_hours(engine)) == 1


# --- the summary -----------------------------------------------------------------------------


def test_summary_counts(engine: Engine) -> None:
    lines = [
        plan("acme", "standard", "2026-10-01T00:00:00Z"),
        plan("initech", "trial", "2026-10-01T00:00:00Z"),  # a tenant without usage
        host("acme", "h-1", "2026-10-15T10:03:00Z", ["a"]),
        host("acme", "h-1", "2026-10-15T10:43:00Z", ["b"]),
        host("acme", "h-2", "2026-10-15T11:03:00Z", ["a"], kind="micro"),
        "",
        host("globex", "h-1", "2026-10-15T10:03:00Z", ["a"]),
        service("globex", "web", "2026-10-15T12:03:00Z", ["r"]),
        monitor("globex", "m-1", "2026-10-15T10:00:00Z", "created"),
        role("acme", "web:app", "2026-10-15T10:00:00Z", True),
        member("acme", "web:app", "h-1", "2026-10-15T10:00:00Z", True),
        BAD_KIND,
    ]
    summary = ingest_lines(engine, lines, skip_invalid=True)
    assert summary.as_dict() | {"rows_written": None} == {
        "records": 10,  # valid, non-blank lines
        "tenants": 3,  # acme, initech, globex
        "hosts": 3,  # acme/h-1, acme/h-2, globex/h-1
        "hours": 3,  # 10:00, 11:00 (hosts) and 12:00 (service)
        "rejected": 1,
        "rows_written": None,
    }


# --- per-tenant counts (hostmeter ingest's tenant_ingested events) ---------------------------

SUMMARY_LINES = [
    plan("acme", "standard", "2026-10-01T00:00:00Z"),
    plan("initech", "trial", "2026-10-01T00:00:00Z"),  # a tenant without usage
    host("acme", "h-1", "2026-10-15T10:03:00Z", ["a"]),
    host("acme", "h-1", "2026-10-15T10:03:00Z", ["a"]),  # the same post twice: two lines
    host("acme", "h-2", "2026-10-15T11:03:00+09:00", ["a"], kind="micro"),
    "",
    host("globex", "h-1", "2026-10-15T10:03:00Z", ["a"]),
    # "v": 1.0 is version 1 to the full parser, not to the fast path's decoder: the slow way
    _line(type="host_post", v=1.0, tenant="globex", host="h-2", kind="standard",
          at="2026-10-15T10:03:00Z", metrics=["b"], status="poweroff"),
    service("globex", "web", "2026-10-15T12:03:00Z", ["r"]),
    monitor("globex", "m-1", "2026-10-15T10:00:00Z", "created"),
    role("acme", "web:app", "2026-10-15T10:00:00Z", True),
    member("acme", "web:app", "h-1", "2026-10-15T10:00:00Z", True),
    BAD_KIND,  # acme: skipped, not counted
    service("acme", "web", "2026-10-15T10:03:00Z", ["r"]),
]


def test_posts_and_records_are_counted_per_tenant(engine: Engine) -> None:
    summary = ingest_lines(engine, SUMMARY_LINES, skip_invalid=True, batch_size=2)
    assert summary.per_tenant == {  # [posts, records], in the order the input names them
        "acme": [4, 7],
        "initech": [0, 1],
        "globex": [3, 4],
    }
    assert sum(r for _, r in summary.per_tenant.values()) == summary.records == 12
    assert (summary.tenants_not_itemised, summary.not_itemised) == (0, [0, 0])


def test_tenants_past_the_limit_are_counted_together(engine: Engine) -> None:
    lines = [host(f"t-{i % 5}", "h-1", f"2026-10-15T1{i % 3}:03:00Z", ["a"]) for i in range(23)]
    lines.append(plan("t-4", "standard", "2026-10-01T00:00:00Z"))
    summary = ingest_lines(engine, lines, itemise=3)
    assert summary.per_tenant == {"t-0": [5, 5], "t-1": [5, 5], "t-2": [5, 5]}
    assert summary.tenants == 5 and summary.tenants_not_itemised == 2
    assert summary.not_itemised == [8, 9]  # t-3 and t-4 together: 4 + 4 posts, and a plan


def test_counts_restart_with_every_input_and_a_rejected_input_has_none(engine: Engine) -> None:
    good = [host("acme", "h-1", "2026-10-15T10:03:00Z", ["a"])]
    assert ingest_lines(engine, good).per_tenant == {"acme": [1, 1]}
    assert ingest_lines(engine, good).per_tenant == {"acme": [1, 1]}  # loaded again: again
    with pytest.raises(InvalidBatch):
        ingest_lines(engine, [*good, BAD_KIND])  # the CLI logs nothing for it


# --- plan history ----------------------------------------------------------------------------

T0 = datetime(2026, 10, 14, 15, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        pytest.param(
            [
                [
                    plan("acme", "trial", "2026-10-14T15:00:00Z"),
                    plan("acme", "standard", "2026-10-14T15:00:00Z"),
                ]
            ],
            [("acme", T0, "standard")],
            id="same-file",
        ),
        pytest.param(
            [
                [
                    plan("acme", "standard", "2026-10-14T15:00:00Z"),
                    plan("acme", "free", "2026-10-15T00:00:00+09:00"),
                ]
            ],
            [("acme", T0, "free")],
            id="same-instant-other-offset",
        ),
        pytest.param(
            [
                [plan("acme", "standard", "2026-10-14T15:00:00Z")],
                [plan("acme", "trial", "2026-10-15T00:00:00+09:00")],
            ],
            [("acme", T0, "trial")],
            id="later-file",
        ),
        pytest.param(
            [
                [plan("acme", "trial", "2026-10-14T15:00:00Z")],
                [plan("acme", "standard", "2026-10-14T15:00:00Z")],
                [plan("acme", "trial", "2026-10-14T15:00:00Z")],
            ],
            [("acme", T0, "trial")],
            id="back-and-forth",
        ),
        pytest.param(
            [
                [
                    plan("acme", "trial", "2026-10-14T15:00:00Z"),
                    plan("globex", "free", "2026-10-14T15:00:00Z"),
                    plan("acme", "standard", "2026-10-14T16:00:00Z"),
                ]
            ],
            [
                ("acme", T0, "trial"),
                ("acme", datetime(2026, 10, 14, 16, tzinfo=UTC), "standard"),
                ("globex", T0, "free"),
            ],
            id="other-instants-and-tenants-are-kept",
        ),
    ],
)
def test_a_later_plan_record_for_the_same_instant_wins(
    engine: Engine, loads: list[list[str]], expected: list[Any]
) -> None:
    for batch_size in (1, 5000):
        for lines in loads:
            ingest_lines(engine, as_tenants_of(f"b{batch_size}", lines), batch_size=batch_size)
    for batch_size in (1, 5000):
        got = of_tenants_of(f"b{batch_size}", {row: None for row in plans(engine)})
        assert list(got) == expected, f"batch_size={batch_size}"


# --- streaming -------------------------------------------------------------------------------


def test_input_is_consumed_lazily_in_batches(engine: Engine) -> None:
    """Host posts are held per host-hour (``hold_keys`` of them) and written when that many
    have gathered: the input is read as it is written, never whole."""
    total, batch_size = 50_000, 1000
    pulled = 0

    def lines() -> Iterator[str]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield host("acme", f"h-{i}", "2026-10-15T10:03:00Z", ["a", "b"])

    seen_at_statement: list[int] = []

    def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "INSERT")):
            seen_at_statement.append(pulled)

    source = lines()
    sa.event.listen(engine, "before_cursor_execute", spy)
    try:
        summary = ingest_lines(engine, source, batch_size=batch_size, hold_keys=batch_size)
    finally:
        sa.event.remove(engine, "before_cursor_execute", spy)

    assert summary.records == total
    # The first host-hours reached the database after one batch of lines had been read, not the
    # file; then every batch was written before the next one was read.
    first_write = min(n for n in seen_at_statement if n > 1)  # line 1: the tenant's id
    assert first_write == batch_size
    assert set(range(batch_size, total + 1, batch_size)) <= set(seen_at_statement)
    assert host_hours(engine) == {
        ("acme", f"h-{i}", "10-15T10"): ("standard", F("ab")) for i in range(total)
    }


def test_service_metrics_are_distinct_per_service_and_name(engine: sa.Engine) -> None:
    from datetime import UTC, datetime

    from metering.ingest import UsageRecorder
    from metering.records import ServicePost

    at = datetime(2026, 10, 15, 10, 3, tzinfo=UTC)
    UsageRecorder(engine).record([
        ServicePost(tenant="acme", service="web", at=at, metrics=("req.count", "latency")),
        ServicePost(tenant="acme", service="api", at=at, metrics=("req.count",)),
        ServicePost(tenant="acme", service="web", at=at, metrics=("req.count",)),
    ])
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT metric_count FROM service_hours")).scalar_one()
    assert count == 3  # web/req.count, web/latency, api/req.count


def _names_of(engine: Engine, tenant: str, host: str) -> set[str]:
    """The names recorded for ``host`` in its one hour, decoded through the tenant's
    dictionary."""
    with engine.connect() as conn:
        tenant_id = conn.execute(
            sa.select(m.tenants.c.id).where(m.tenants.c.key == tenant)).scalar_one()
        dictionary = dict(conn.execute(
            sa.select(m.metric_names.c.ordinal, m.metric_names.c.name)
            .where(m.metric_names.c.tenant_id == tenant_id)).all())
        blob = conn.execute(
            sa.select(m.host_hours.c.metric_bits)
            .join(m.hosts, m.hosts.c.id == m.host_hours.c.host_id)
            .where(m.hosts.c.tenant_id == tenant_id, m.hosts.c.key == host)).scalar_one()
    bits = int.from_bytes(bytes(blob), "little")
    return {dictionary[i] for i in range(bits.bit_length()) if bits >> i & 1}


@pytest.mark.parametrize("remembered", [48 << 20, 1])
def test_the_same_list_of_names_means_other_bits_in_another_tenant(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, remembered: int
) -> None:
    """The fast path remembers the bitmap of a list of names it has seen; the same bytes in
    another tenant, whose dictionary numbers those names otherwise, must not reuse it (the
    bug: b/h-2 recorded as {q, x} instead of {x, y}). With room for one list only, the
    remembered bitmaps are dropped and computed again, to the same result."""
    from metering import ingest

    monkeypatch.setattr(ingest, "COMBO_BYTES", remembered)

    def line(tenant: str, host: str, minute: int, names: list[str]) -> str:
        return json.dumps({"type": "host_post", "tenant": tenant, "host": host,
                           "kind": "standard", "at": f"2026-10-15T10:{minute:02d}:00Z",
                           "metrics": names})

    lines = [
        line("a", "h-1", 1, ["x", "y"]),       # a: x=0, y=1
        line("b", "h-1", 1, ["q"]),            # b: q=0
        line("b", "h-2", 2, ["x", "y"]),       # b: x=1, y=2 — the same bytes as a's list
        line("a", "h-2", 3, ["x", "y"]),
        line("b", "h-3", 4, ["x", "y"]),
    ]
    ingest_lines(engine, lines)
    assert _names_of(engine, "a", "h-1") == {"x", "y"}
    assert _names_of(engine, "b", "h-1") == {"q"}
    assert _names_of(engine, "b", "h-2") == {"x", "y"}
    assert _names_of(engine, "a", "h-2") == {"x", "y"}
    assert _names_of(engine, "b", "h-3") == {"x", "y"}


def test_dictionaries_are_not_reloaded_for_every_post_when_they_outgrow_the_cache(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 tenants of 5 names each, posting every minute, with room for 30 cached names: each
    dictionary is read once, when a list of names is first seen (the bug: the whole cache was
    dropped whenever it was full, and every tenant's dictionary read again minute after
    minute — 41 s instead of 3 s for 60,000 posts of 500 tenants)."""
    from metering import ingest

    monkeypatch.setattr(ingest, "CACHE_NAMES", 30)
    names = [f"m{i}" for i in range(5)]
    lines = [
        json.dumps({"type": "host_post", "tenant": f"t{t}", "host": "h", "kind": "standard",
                    "at": f"2026-10-15T10:{minute:02d}:00Z", "metrics": names})
        for minute in range(10) for t in range(20)
    ]
    ingest_lines(engine, lines)  # the dictionaries are made
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM metric_names" in statement:
            reads.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        summary = ingest_lines(engine, [line.replace("T10:", "T11:") for line in lines])
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert summary.written_rows == 20
    assert len(reads) == 20
