"""Static checks of the container image (infra/docker/) and the OpenTelemetry Collector config
(infra/otel-collector/): no container engine runs in the tests, so the Dockerfile is parsed and
the collector config is read as YAML. The one dynamic check builds the project's wheel from
exactly the files the Dockerfile's builder stage copies, the way that stage builds it.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import yaml

from jobs.cli import metrics as metrics_cli

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "infra" / "docker" / "Dockerfile.dockerignore"
COLLECTOR_CONFIG = ROOT / "infra" / "otel-collector" / "config.yaml"

SECRET_NAME = re.compile(r"KEY|PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)
ENV_REFERENCE = re.compile(r"^\$\{env:[A-Za-z_][A-Za-z0-9_]*\}$")
# Mackerel takes labeled (OpenTelemetry) metrics over OTLP/gRPC only, here; the OTLP/HTTP host
# otlp-vaxila.mackerelio.com is its tracing endpoint and takes no metrics.
MACKEREL_METRICS_ENDPOINT = "otlp.mackerelio.com:4317"


# --------------------------------------------------------------------------- Dockerfile parser


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined
    line: int  # 1-based line of the instruction's first line

    def flags_and_rest(self) -> tuple[dict[str, str], list[str]]:
        """Leading ``--name=value`` flags (COPY --from=..., FROM --platform=...) and the words
        after them (shell-split)."""
        words = shlex.split(self.args)
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comment lines dropped (also inside continuations, as
    Docker does), lines ending in a backslash joined to the next, the keyword upper-cased."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not parts):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, "the Dockerfile ends inside a line continuation"
    return instructions


def split_stages(instructions: list[Instruction]) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            _, words = instruction.flags_and_rest()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            assert instruction.keyword == "ARG", f"line {instruction.line}: before any FROM"
    return stages


def env_pairs(instruction: Instruction) -> list[tuple[str, str]]:
    """``ENV A=1 B="x y"`` and the legacy ``ENV A 1`` form; ``ARG A`` / ``ARG A=1``."""
    words = shlex.split(instruction.args)
    if instruction.keyword == "ENV" and words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [(w.partition("=")[0], w.partition("=")[2]) for w in words]


def image_is_pinned(image: str) -> bool:
    """A digest, or a tag that is not ``latest`` and carries a version number."""
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    last = image.rsplit("/", 1)[-1]  # a registry host may carry a port: host:5000/name
    if ":" not in last:
        return False
    tag = last.partition(":")[2]
    return tag != "latest" and re.search(r"\d", tag) is not None


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**/`` any directories (or none), ``**`` anything,
    ``*`` and ``?`` within one path element."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker's ignore rules exclude ``path`` (relative to the context root): the last
    matching pattern wins, ``!`` re-includes, a pattern matching a directory excludes what is
    inside it."""
    parents = [str(p) for p in reversed(PurePosixPath(path).parents) if str(p) != "."]
    candidates = [*parents, path]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _ignore_regex(str(PurePosixPath(raw.removeprefix("!").strip("/"))))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return split_stages(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")))


def _builder(stages: list[Stage]) -> Stage:
    final = stages[-1]
    sources = {i.flags_and_rest()[0].get("from") for i in final.of("COPY")} - {None}
    assert sources, "the final stage copies nothing from a builder stage (COPY --from=...)"
    (source,) = sources
    for index, stage in enumerate(stages[:-1]):
        if source in (stage.name, str(index)):
            return stage
    raise AssertionError(f"COPY --from={source}: no such earlier stage")


# --------------------------------------------------------------------------- parser self-tests


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = (
        "# comment\nFROM python:3.11.10-slim AS b\n"
        "RUN a \\\n  # inner comment\n  && b\n"
        "from python:3.11.10-slim\nENV K=v \\\n    L=w\n"
    )
    instructions = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in instructions] == [
        ("FROM", "python:3.11.10-slim AS b", 2),
        ("RUN", "a && b", 3),
        ("FROM", "python:3.11.10-slim", 6),
        ("ENV", "K=v L=w", 7),
    ]
    assert [(s.base, s.name) for s in split_stages(instructions)] == [
        ("python:3.11.10-slim", "b"), ("python:3.11.10-slim", None)]


@pytest.mark.parametrize(("image", "pinned"), [
    ("python:3.11.10-slim-bookworm", True),
    ("python@sha256:" + "a" * 64, True),
    ("registry.example:5000/python:3.11", True),
    ("python", False),
    ("python:latest", False),
    ("python:slim", False),
    ("registry.example:5000/python", False),
])
def test_image_is_pinned_helper(image: str, pinned: bool) -> None:
    assert image_is_pinned(image) is pinned


def test_dockerignore_matcher() -> None:
    patterns = ["**/__pycache__", "*.db", "tests", "docs", "!docs/keep.md"]
    assert dockerignore_excludes(patterns, "jobs/__pycache__/cli.cpython-311.pyc")
    assert dockerignore_excludes(patterns, "__pycache__")
    assert dockerignore_excludes(patterns, "hostmeter.db")
    assert dockerignore_excludes(patterns, "tests/test_x.py")
    assert not dockerignore_excludes(patterns, "docs/keep.md")
    assert not dockerignore_excludes(patterns, "jobs/cli.py")


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"


def test_every_base_image_is_version_pinned(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:  # FROM an earlier stage
            continue
        assert image_is_pinned(stage.base), f"FROM {stage.base}: pin a version tag or digest"
    assert stages[-1].base == _builder(stages).base, (
        "runtime and builder should share one pinned base (the wheels are built for it)")


def test_final_stage_runs_as_a_non_root_user_before_the_entrypoint(stages: list[Stage]) -> None:
    final = stages[-1]
    users = final.of("USER")
    assert users, "the final stage sets no USER: the container would run as root"
    user = users[-1].args.split(":")[0].strip()
    assert user not in {"root", "0"}, f"USER {users[-1].args} is root"
    entrypoints = final.of("ENTRYPOINT")
    assert entrypoints, "the final stage has no ENTRYPOINT"
    assert users[-1].line < entrypoints[-1].line, "USER must come before ENTRYPOINT"


def test_entrypoint_is_hostmeter_in_exec_form(stages: list[Stage]) -> None:
    final = stages[-1]
    (entrypoint,) = final.of("ENTRYPOINT")
    # Exec form: JSON; shell form (`ENTRYPOINT hostmeter`) would run under /bin/sh -c, drop
    # CMD's arguments and leave hostmeter deaf to SIGTERM.
    assert json.loads(entrypoint.args) == ["hostmeter"]
    (cmd,) = final.of("CMD")
    assert json.loads(cmd.args) == ["--help"]


def test_no_add_of_remote_sources(stages: list[Stage]) -> None:
    for stage in stages:
        for add in stage.of("ADD"):
            _, words = add.flags_and_rest()
            for source in words[:-1]:
                assert not re.match(r"^(https?|git|ssh)://|^git@", source), (
                    f"line {add.line}: ADD {source} fetches unverified remote content")


def test_final_stage_installs_only_the_builders_wheels(stages: list[Stage]) -> None:
    final = stages[-1]
    builder = _builder(stages)
    for copy in final.of("COPY") + final.of("ADD"):
        flags, words = copy.flags_and_rest()
        assert "from" in flags, (
            f"line {copy.line}: the runtime stage copies from the build context; only the "
            f"builder's wheels belong there")
        for source in words[:-1]:
            assert PurePosixPath(source).parts[:2] == ("/", "wheels"), (
                f"line {copy.line}: COPY --from={flags['from']} {source}: not a wheel")
    built = [r.args for r in builder.of("RUN") if re.search(r"\bpip\b.*\bwheel\b", r.args)]
    assert any("/wheels" in b for b in built), "the builder builds no wheels into /wheels"
    installs = [r.args for r in final.of("RUN") if re.search(r"\bpip\b.*\binstall\b", r.args)]
    assert installs, "the runtime stage installs nothing"
    for install in installs:
        # Without --no-index pip would also consult PyPI, where another `hostmeter` could win.
        assert "--no-index" in install and "/wheels" in install, install


def test_no_secrets_in_env_or_arg() -> None:
    # Every instruction, also the ARGs before the first FROM.
    for instruction in parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")):
        if instruction.keyword in {"ENV", "ARG"}:
            for name, value in env_pairs(instruction):
                assert not (SECRET_NAME.search(name) and value), (
                    f"line {instruction.line}: {name} is baked into the image; pass it at run "
                    f"time (docker run -e / a secret store)")


def test_runtime_environment(stages: list[Stage]) -> None:
    env = dict(pair for i in stages[-1].of("ENV") for pair in env_pairs(i))
    assert env.get("PYTHONUNBUFFERED") == "1"
    log_dir = PurePosixPath(env.get("HOSTMETER_LOG_DIR", ""))
    assert log_dir.is_relative_to("/tmp"), f"HOSTMETER_LOG_DIR={log_dir}: not writable"


def test_non_root_user_owns_its_working_directory(stages: list[Stage]) -> None:
    # WORKDIR creates a missing directory owned by root; the default sqlite:///hostmeter.db is
    # relative to it, so the user must have been given it before.
    final = stages[-1]
    (workdir,) = final.of("WORKDIR")
    user = final.of("USER")[-1].args.split(":")[0].strip()
    runs = " ".join(r.args for r in final.of("RUN"))
    owned = re.search(
        rf"(chown\s+(-\S+\s+)*{re.escape(user)}[:\s][^&;]*{re.escape(workdir.args)}"
        rf"|install\s+[^&;]*-o\s+{re.escape(user)}\b[^&;]*{re.escape(workdir.args)})",
        runs,
    )
    assert owned, f"WORKDIR {workdir.args} is not made the property of user {user}"


def test_dockerignore_keeps_what_the_builder_copies(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for source, _ in _builder_copies(_builder(stages)):
        assert not dockerignore_excludes(patterns, source), f"{source} is ignored"
    for local_state in (".git/config", "hostmeter.db", "logs/hostmeter.jsonl", ".venv/pyvenv.cfg"):
        assert dockerignore_excludes(patterns, local_state), f"{local_state} enters the context"


def test_dockerfile_exposes_the_metrics_serve_port(stages: list[Stage]) -> None:
    exposed = {int(p.split("/")[0]) for e in stages[-1].of("EXPOSE") for p in e.args.split()}
    assert _serve_default_port() in exposed


# --------------------------------------------------------------------------- the wheel


def _builder_copies(builder: Stage) -> Iterator[tuple[str, str]]:
    """(source relative to the context root, destination relative to the builder's WORKDIR)
    for each build-context COPY of the builder stage."""
    for copy in builder.of("COPY"):
        flags, words = copy.flags_and_rest()
        assert "from" not in flags
        *sources, dest = words
        for source in sources:
            target = dest.rstrip("/") + "/" + PurePosixPath(source).name if (
                dest.endswith("/") and not source.endswith("/")) else dest
            yield source.rstrip("/"), target


@pytest.mark.slow
def test_wheel_built_like_the_builder_has_package_data_and_entry_point(
    stages: list[Stage], tmp_path: Path
) -> None:
    # Only what the builder stage COPYs, so a file the Dockerfile forgets fails here too.
    context = tmp_path / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for source, dest in _builder_copies(_builder(stages)):
        src, dst = ROOT / source, context / dest
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "--wheel-dir", str(wheels), str(context)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = wheels.glob("hostmeter-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for required in ("jobs/cli/__init__.py", "jobs/cli/metrics.py",
                         "migrations/versions/0001_usage_tables.py", "migrations/env.py",
                         "migrations/script.py.mako", "billing/catalogs/2019-10.toml"):
            assert required in names, f"{required} missing from {wheel.name}"
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(archive.read(entry_points).decode())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        # pyproject.toml's readme: setuptools builds without the file, just without it.
        readme_first_line = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[0]
        assert readme_first_line in archive.read(metadata).decode(), "README.md not copied"
    assert parser["console_scripts"]["hostmeter"].strip() == "jobs.cli:main"


# --------------------------------------------------------------------------- collector config


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    config = yaml.safe_load(COLLECTOR_CONFIG.read_text(encoding="utf-8"))
    assert isinstance(config, dict)
    return config


def _serve_default_port() -> int:
    serve = metrics_cli.metrics_group.commands["serve"]
    (port,) = [p for p in serve.params if isinstance(p, click.Option) and "--port" in p.opts]
    assert isinstance(port.default, int)
    return port.default


def test_metrics_pipeline_wiring(collector: dict[str, Any]) -> None:
    metrics = collector["service"]["pipelines"]["metrics"]
    assert metrics["receivers"] == ["prometheus"]
    assert metrics["processors"][0] == "memory_limiter", "memory_limiter must come first"
    assert "batch" in metrics["processors"]
    assert metrics["exporters"], "the metrics pipeline exports nowhere"


def test_every_referenced_component_is_defined(collector: dict[str, Any]) -> None:
    for pipeline_name, pipeline in collector["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            defined = collector.get(kind) or {}
            for component in pipeline.get(kind, []):
                assert component in defined, f"{pipeline_name}: {kind[:-1]} {component} undefined"
    for extension in collector["service"].get("extensions", []):
        assert extension in (collector.get("extensions") or {}), f"extension {extension}"


def test_metrics_are_exported_to_mackerels_metrics_endpoint(collector: dict[str, Any]) -> None:
    for name in collector["service"]["pipelines"]["metrics"]["exporters"]:
        kind = name.split("/")[0]
        exporter = collector["exporters"][name]
        assert kind in {"otlp", "otlp_grpc"}, (
            f"{name}: Mackerel takes labeled metrics over OTLP/gRPC only")
        assert exporter["endpoint"] == MACKEREL_METRICS_ENDPOINT, exporter["endpoint"]
        assert "vaxila" not in str(exporter), "otlp-vaxila is Mackerel's tracing endpoint"
        assert not exporter.get("tls", {}).get("insecure"), "the API key would travel in clear"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, str(key), value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")


def test_api_key_comes_from_the_environment(collector: dict[str, Any]) -> None:
    for name in collector["service"]["pipelines"]["metrics"]["exporters"]:
        headers = collector["exporters"][name].get("headers", {})
        assert headers.get("Mackerel-Api-Key") == "${env:MACKEREL_API_KEY}"
    for path, key, value in _walk(collector):
        if SECRET_NAME.search(key):
            assert isinstance(value, str) and ENV_REFERENCE.match(value), (
                f"{path}.{key} holds a literal; reference ${{env:...}} instead")


def test_memory_limiter_has_a_limit(collector: dict[str, Any]) -> None:
    limiter = collector["processors"]["memory_limiter"]
    assert limiter.get("check_interval"), "memory_limiter needs a check_interval"
    if "limit_mib" in limiter:
        assert limiter["limit_mib"] > 0
        assert 0 <= limiter.get("spike_limit_mib", 0) < limiter["limit_mib"]
    else:
        assert 0 < limiter.get("limit_percentage", 0) <= 100, "memory_limiter sets no limit"
        assert 0 <= limiter.get("spike_limit_percentage", 0) < limiter["limit_percentage"]


def test_scrape_target_is_hostmeter_metrics_serve(collector: dict[str, Any]) -> None:
    scrape_configs = collector["receivers"]["prometheus"]["config"]["scrape_configs"]
    (job,) = [c for c in scrape_configs if c["job_name"] == "hostmeter"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for s in job["static_configs"] for t in s["targets"]]
    assert targets
    port = _serve_default_port()
    for target in targets:
        assert target.rsplit(":", 1)[-1] == str(port), (
            f"{target}: `hostmeter metrics serve` listens on {port} by default")


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert match, duration
    return float(match[1]) * units[match[2]]


def test_scrape_timeout_fits_the_interval(collector: dict[str, Any]) -> None:
    # Prometheus refuses a scrape_timeout longer than scrape_interval (its default is 10s).
    for job in collector["receivers"]["prometheus"]["config"]["scrape_configs"]:
        interval = _seconds(job.get("scrape_interval", "1m"))
        assert _seconds(job.get("scrape_timeout", "10s")) <= interval
