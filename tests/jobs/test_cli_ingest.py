"""``hostmeter ingest`` as a real process: output, exit codes, stderr, and what it leaves behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from jobs.cli import ingest as ingest_cli
from metering import db
from metering import models as m
from metering.ingest import IngestSummary

ROOT = Path(__file__).resolve().parents[2]
# The installed console script, run the way a user or an ECS task runs it.
HOSTMETER = shutil.which("hostmeter", path=str(Path(sys.executable).parent)) or "hostmeter"
UNREACHABLE = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/nope"

GOOD = (
    "\n".join(
        [
            '{"type":"plan","tenant":"acme","plan":"standard","at":"2026-10-15T00:00:00+09:00"}',
            '{"type":"host_post","tenant":"acme","host":"h-1","kind":"standard",'
            '"at":"2026-10-15T10:03:00Z","metrics":["loadavg5","cpu.user"]}',
            "",
            '{"type":"host_post","tenant":"acme","host":"h-1","kind":"standard",'
            '"at":"2026-10-15T11:03:00Z","metrics":["loadavg5"],"status":"poweroff"}',
            '{"type":"host_post","tenant":"globex","host":"h-1","kind":"micro",'
            '"at":"2026-10-15T10:59:59Z","metrics":["a","b","a"]}',
        ]
    )
    + "\n"
)
GOOD_SUMMARY = {"records": 4, "tenants": 2, "hosts": 2, "hours": 2, "rejected": 0}

BAD_LINES = {
    "kind": '{"type":"host_post","tenant":"acme","host":"h-2","kind":"enormous-host-kind",'
    '"at":"2026-10-15T10:03:00Z","metrics":["loadavg5"]}',
    "type": '{"type":["host_post"],"tenant":"acme"}',
}


def hostmeter(
    *args: str, db_url: str, tmp_path: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTMETER_")}
    env |= {"HOSTMETER_DATABASE_URL": db_url, "HOSTMETER_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(
        [HOSTMETER, *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """What a person reads on stderr (structured log lines, which start with ``{``, aside)."""
    return [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("{")]


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    errors = [ln for ln in stderr_lines(proc) if ln.startswith("hostmeter: error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def row_counts(db_url: str) -> dict[str, int]:
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {
                t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in (m.tenants, m.hosts, m.metric_names, m.host_hours, m.plan_changes)
            }
    finally:
        engine.dispose()


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "usage.jsonl"
    path.write_text(GOOD)
    return path


def with_bad_line(tmp_path: Path, bad: str) -> Path:
    lines = GOOD.splitlines()
    lines.insert(2, bad)  # line 3
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_good_file_prints_a_summary_table(db_url: str, tmp_path: Path, good_file: Path) -> None:
    proc = hostmeter("ingest", str(good_file), db_url=db_url, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert stderr_lines(proc) == []
    assert "records" in proc.stdout and "rejected" in proc.stdout
    data_rows = [ln for ln in proc.stdout.splitlines() if re.fullmatch(r"[\s│|]*\d[\d\s│|]*", ln)]
    assert len(data_rows) == 1, proc.stdout
    records, tenants, hosts, hours, _rows_written, rejected = map(
        int, re.findall(r"\d+", data_rows[0])
    )
    assert (records, tenants, hosts, hours, rejected) == tuple(GOOD_SUMMARY.values())
    assert row_counts(db_url) == {
        "tenants": 2,
        "hosts": 2,
        "metric_names": 4,
        "host_hours": 3,
        "plan_changes": 1,
    }


def test_format_json(db_url: str, tmp_path: Path, good_file: Path) -> None:
    proc = hostmeter("ingest", "--format", "json", str(good_file), db_url=db_url, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {k: out[k] for k in GOOD_SUMMARY} == GOOD_SUMMARY
    assert out["errors"] == []


def log_events(tmp_path: Path, event: str) -> list[dict[str, Any]]:
    path = tmp_path / "logs" / "hostmeter.jsonl"
    if not path.exists():
        return []
    events = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]
    return [e for e in events if e["event"] == event]


def test_a_tenant_ingested_line_per_tenant_once_committed(db_url: str, tmp_path: Path,
                                                         good_file: Path) -> None:
    before = datetime.now(UTC)
    proc = hostmeter("ingest", str(good_file), db_url=db_url, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = log_events(tmp_path, "tenant_ingested")
    assert [{k: e[k] for k in ("tenant", "posts", "records")} for e in events] == [
        {"tenant": "acme", "posts": 2, "records": 3},  # a plan and two host posts
        {"tenant": "globex", "posts": 1, "records": 1},
    ]
    for e in events:
        assert e.keys() == {"tenant", "posts", "records", "timestamp", "level", "event", "job",
                            "run_id", "logical_time"}
        assert (e["level"], e["job"]) == ("info", "ingest")
        assert datetime.fromisoformat(e["logical_time"]) >= before  # when the command started
    assert len({e["run_id"] for e in events}) == 1
    assert log_events(tmp_path, "tenants_not_itemised") == []
    # on stderr too (not a terminal: info and up), as JSON lines a person's output skips
    assert sum('"tenant_ingested"' in ln for ln in proc.stderr.splitlines()) == 2

    hostmeter("ingest", str(good_file), db_url=db_url, tmp_path=tmp_path)  # loaded again
    again = log_events(tmp_path, "tenant_ingested")
    assert len(again) == 4 and again[2]["run_id"] != events[0]["run_id"]


def test_a_rejected_input_logs_no_tenant_lines(db_url: str, tmp_path: Path) -> None:
    proc = hostmeter("ingest", str(with_bad_line(tmp_path, BAD_LINES["kind"])), db_url=db_url,
                     tmp_path=tmp_path)
    assert proc.returncode == 2
    assert log_events(tmp_path, "tenant_ingested") == []

    skipped = hostmeter("ingest", "--skip-invalid", str(with_bad_line(tmp_path, BAD_LINES["kind"])),
                        db_url=db_url, tmp_path=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    assert [(e["tenant"], e["posts"], e["records"])
            for e in log_events(tmp_path, "tenant_ingested")] == [
        ("acme", 2, 3), ("globex", 1, 1)]  # the skipped line is not counted


def test_tenants_past_the_itemised_ones_are_one_line() -> None:
    summary = IngestSummary(records=27, tenants=5, per_tenant={"t-0": [5, 6], "t-1": [5, 5]},
                            not_itemised=[12, 16], tenants_not_itemised=3)
    started = datetime(2026, 10, 15, 10, 7, tzinfo=UTC)
    structlog.contextvars.clear_contextvars()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        ingest_cli._log_tenants(summary, started)
    shared = {"job": "ingest", "logical_time": started.isoformat(), "log_level": "info"}
    assert [{k: v for k, v in e.items() if k != "run_id"} for e in events] == [
        {"event": "tenant_ingested", "tenant": "t-0", "posts": 5, "records": 6, **shared},
        {"event": "tenant_ingested", "tenant": "t-1", "posts": 5, "records": 5, **shared},
        {"event": "tenants_not_itemised", "tenants": 3, "posts": 12, "records": 16, **shared},
    ]
    assert len({e["run_id"] for e in events}) == 1
    assert structlog.contextvars.get_contextvars() == {}


@pytest.mark.parametrize("field", sorted(BAD_LINES))
def test_a_bad_line_rejects_the_file(db_url: str, tmp_path: Path, field: str) -> None:
    path = with_bad_line(tmp_path, BAD_LINES[field])
    proc = hostmeter("ingest", str(path), db_url=db_url, tmp_path=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "line 3" in line
    assert f"field '{field}'" in line
    assert "expected one of" in line
    assert "nothing was written" in line
    assert proc.stdout == ""
    assert set(row_counts(db_url).values()) == {0}


def test_several_bad_lines_are_listed_one_per_line(db_url: str, tmp_path: Path) -> None:
    lines = GOOD.splitlines()
    lines[1:1] = [BAD_LINES["kind"], "{oops", BAD_LINES["type"]]  # lines 2, 3, 4
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = hostmeter("ingest", str(path), db_url=db_url, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "3 invalid record(s)" in error_line(proc)
    details = [ln for ln in stderr_lines(proc) if not ln.startswith("hostmeter: error: ")]
    # One complete line per bad record: nothing wrapped onto a line of its own.
    assert [ln.split(":")[0].strip() for ln in details] == ["line 2", "line 3", "line 4"]
    assert "expected one of standard, micro)" in details[0]
    assert set(row_counts(db_url).values()) == {0}


def test_skip_invalid_loads_the_good_lines(db_url: str, tmp_path: Path) -> None:
    path = with_bad_line(tmp_path, BAD_LINES["kind"])
    proc = hostmeter("ingest", "--skip-invalid", str(path), db_url=db_url, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = stderr_lines(proc)
    assert "skipped 1 invalid line(s)" in lines[0]
    assert any(
        ln.strip().startswith("line 3: field 'kind'") and ln.endswith("micro)") for ln in lines
    ), proc.stderr
    assert row_counts(db_url)["host_hours"] == 3

    as_json = hostmeter(
        "ingest", "--skip-invalid", "--format", "json", str(path), db_url=db_url, tmp_path=tmp_path
    )
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["records"] == 4 and out["rejected"] == 1
    assert [(e["line"], e["field"]) for e in out["errors"]] == [(3, "kind")]
    assert "expected one of standard, micro" in out["errors"][0]["message"]


def test_reads_stdin(db_url: str, tmp_path: Path) -> None:
    proc = hostmeter(
        "ingest", "--format", "json", "-", db_url=db_url, tmp_path=tmp_path, stdin=GOOD.encode()
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {k: out[k] for k in GOOD_SUMMARY} == GOOD_SUMMARY
    assert row_counts(db_url)["host_hours"] == 3


def test_bad_stdin_is_rejected_too(db_url: str, tmp_path: Path) -> None:
    proc = hostmeter(
        "ingest",
        "-",
        db_url=db_url,
        tmp_path=tmp_path,
        stdin=GOOD.encode() + b'{"type":"plan","tenant":"\xff"}\n',
    )
    assert proc.returncode == 2
    assert "line 6: not UTF-8 text" in error_line(proc)
    assert set(row_counts(db_url).values()) == {0}


@pytest.mark.parametrize("url", ["sqlite", UNREACHABLE], ids=["sqlite", "unreachable"])
def test_missing_file_exits_2_before_touching_the_database(tmp_path: Path, url: str) -> None:
    fresh = tmp_path / "fresh.db"
    db_url = f"sqlite:///{fresh}" if url == "sqlite" else url
    proc = hostmeter("ingest", str(tmp_path / "nope.jsonl"), db_url=db_url, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "nope.jsonl': no such file" in error_line(proc)  # the path, quoted, whole
    assert not fresh.exists()


def test_unreachable_database(tmp_path: Path, good_file: Path) -> None:
    proc = hostmeter("ingest", str(good_file), db_url=UNREACHABLE, tmp_path=tmp_path)
    assert proc.returncode == 1
    assert stderr_lines(proc) == [error_line(proc)]
    assert "cannot connect to" in error_line(proc)
    assert "s3cret" not in proc.stderr
    assert proc.stdout == ""


# --- poison lines, and reporting every bad line ------------------------------------------------


def _random_text(seed: int, size: int) -> str:
    """``size`` bytes of random four-byte characters: PostgreSQL cannot compress them away."""
    import random

    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x10000, 0x110000)) for _ in range(size // 4))


POISON = [
    b'{"type":"plan","x":' + b"[" * 1500 + b"]" * 1500 + b"}",  # RecursionError
    b'{"type":"plan","x":' + b"9" * 4301 + b"}",  # ValueError: too many digits
    b'{"type":"plan","tenant":"acme","plan":"free","at":"9999-12-31T23:30:00-05:00"}',
    b'{"type":"plan","tenant":"acme","plan":"free","at":"0001-01-01T00:30:00+05:00"}',
    json.dumps({"type": "service_post", "tenant": "acme", "service": _random_text(1, 1020),
                "at": "2026-10-15T10:03:00Z", "metrics": [_random_text(2, 2000)]}).encode(),
    b'{"type":"plan","tenant":"\\ud800","plan":"free","at":"2026-10-15T00:00:00Z"}',
    b'{"type":"plan","tenant":"ac\x00me"}',
    b'"just a string"',
    b'{"type":"plan","tenant":"\xc3\x28"}',
    b'{"type":"plan","pad":"' + b"x" * (3 << 20) + b'"}',  # 3 MiB
]


def _with_poison(tmp_path: Path, *, bom: bool = True) -> tuple[Path, list[int]]:
    """GOOD's lines with a poison line after each of the first ones; the poison line numbers."""
    out: list[bytes] = []
    at = []
    good = [ln.encode() for ln in GOOD.splitlines()]
    for i, bad in enumerate(POISON):
        if i < len(good):
            out.append(good[i])
        out.append(bad)
        at.append(len(out))
    out += good[len(POISON) :]
    path = tmp_path / "poison.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(out) + b"\n")
    return path, at


GOOD_ROWS = {"tenants": 2, "hosts": 2, "metric_names": 4, "host_hours": 3, "plan_changes": 1}


def test_poison_lines_are_rejected_lines_not_a_traceback(db_url: str, tmp_path: Path) -> None:
    path, at = _with_poison(tmp_path)
    proc = hostmeter("ingest", str(path), db_url=db_url, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{len(POISON)} invalid record(s)" in error_line(proc)
    details = [ln for ln in stderr_lines(proc) if not ln.startswith("hostmeter: error: ")]
    assert [int(ln.split(":")[0].split()[1]) for ln in details] == at
    assert all(len(ln) < 400 for ln in details), details
    assert set(row_counts(db_url).values()) == {0}


def test_skip_invalid_loads_exactly_the_good_lines_around_poison(
    db_url: str, tmp_path: Path
) -> None:
    path, at = _with_poison(tmp_path)
    proc = hostmeter("ingest", "--skip-invalid", "--format", "json", str(path), db_url=db_url,
                     tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    assert {k: out[k] for k in GOOD_SUMMARY} == GOOD_SUMMARY | {"rejected": len(POISON)}
    assert [e["line"] for e in out["errors"]] == at
    assert row_counts(db_url) == GOOD_ROWS


def test_a_byte_order_mark_at_the_start_of_the_file_is_not_an_error(
    db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    proc = hostmeter("ingest", "--format", "json", str(path), db_url=db_url, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {k: json.loads(proc.stdout)[k] for k in GOOD_SUMMARY} == GOOD_SUMMARY


def _many_bad_lines(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "many.jsonl"
    path.write_text(GOOD + "".join(f'{{"type":"plan","n":{i}}}\n' for i in range(n)))
    return path


@pytest.mark.parametrize("skip", [False, True], ids=["reject", "skip-invalid"])
def test_every_bad_line_is_counted_twenty_listed_and_all_in_json(
    db_url: str, tmp_path: Path, skip: bool
) -> None:
    n = 45
    path = _many_bad_lines(tmp_path, n)
    flags = ["--skip-invalid"] if skip else []
    first_bad = len(GOOD.splitlines()) + 1

    table = hostmeter("ingest", *flags, str(path), db_url=db_url, tmp_path=tmp_path)
    assert table.returncode == (0 if skip else 2), table.stderr
    listed = [ln for ln in stderr_lines(table) if ln.startswith("  line ")]
    assert [int(ln.split(":")[0].split()[1]) for ln in listed] == list(
        range(first_bad, first_bad + 20)
    )
    assert f"  … and {n - 20} more" in stderr_lines(table)
    if skip:
        assert f"skipped {n} invalid line(s)" in table.stderr
    else:
        assert f"{n} invalid record(s)" in error_line(table)

    as_json = hostmeter("ingest", *flags, "--format", "json", str(path), db_url=db_url,
                        tmp_path=tmp_path)
    assert as_json.returncode == (0 if skip else 2), as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["rejected"] == n
    assert [e["line"] for e in out["errors"]] == list(range(first_bad, first_bad + n))
    assert all(e["field"] == "tenant" and "missing" in e["message"] for e in out["errors"])
    if skip:
        assert out["records"] == GOOD_SUMMARY["records"]
        assert row_counts(db_url) == GOOD_ROWS
    else:
        assert (out["records"], out["rows_written"]) == (GOOD_SUMMARY["records"], 0)
        assert "nothing was written" in error_line(as_json)
        assert set(row_counts(db_url).values()) == {0}
