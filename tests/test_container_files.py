"""The Dockerfile, compose.yaml and the systemd unit say what they should, and the Dockerfile works.

There is no Docker engine here, so the Dockerfile is parsed, and its build is replayed outside
Docker: the build context it COPYs (minus .dockerignore), its own `pip wheel` command, and its
own install command into a fresh virtualenv. If the image would lack a file or a command, so does
that virtualenv.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgprojector.cli import build_parser
from pgprojector.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
UNIT = ROOT / "deploy" / "pgprojector.service"
ENV_EXAMPLE = ROOT / "deploy" / "pgprojector.env.example"


# --- Dockerfile ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT/CMD (after any --options), or AssertionError."""
        text = self.arguments
        while text.startswith("--"):
            text = text.split(None, 1)[1]
        if text.startswith("CMD "):  # HEALTHCHECK [options] CMD [...]
            text = text[4:].lstrip()
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(part, str) for part in value), text
        return value

    def flags_and_command(self) -> tuple[dict[str, str], str]:
        """A RUN's --flag=value options, and its shell command."""
        flags: dict[str, str] = {}
        text = self.arguments
        while text.startswith("--"):
            flag, text = text.split(None, 1)
            name, _, value = flag[2:].partition("=")
            flags[name] = value
        return flags, text


@dataclass(frozen=True)
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.image}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped, split at each FROM."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue  # Docker drops comment lines, even inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line.strip())
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(arguments.split()))
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        else:
            assert stages, f"{line!r} comes before any FROM"
            stages[-1].instructions.append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _builder(stages: list[Stage]) -> Stage:
    return next(stage for stage in stages[:-1] if any("pip wheel" in r.arguments for r in stage.all("RUN")))


def _wheel_run(stage: Stage) -> Instruction:
    return next(r for r in stage.all("RUN") if "pip wheel" in r.arguments)


def _install_run(stage: Stage) -> Instruction:
    return next(r for r in stage.all("RUN") if "pip install" in r.arguments)


def test_dockerfile_is_multi_stage_on_a_slim_python_of_at_least_3_11(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        match = re.fullmatch(r"python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-\w+)?(?:@sha256:[0-9a-f]{64})?", stage.image)
        assert match, f"FROM {stage.image}: not a python:X.Y-slim image"
        assert (int(match.group(1)), int(match.group(2))) >= (3, 11), stage.image
    assert _builder(stages).name, "the builder stage needs a name for COPY/--mount from="


def test_final_stage_runs_as_a_non_root_user(stages: list[Stage]) -> None:
    user = stages[-1].last("USER").arguments.split(":")[0]
    assert user not in ("root", "0", "")


def test_entrypoint_cmd_stopsignal_and_environment(stages: list[Stage]) -> None:
    final = stages[-1]
    assert final.last("ENTRYPOINT").exec_form() == ["pgprojector"]
    assert final.last("CMD").exec_form() == ["run"]
    assert final.last("STOPSIGNAL").arguments == "SIGTERM"
    assert any(re.search(r"\bPYTHONUNBUFFERED=1\b", env.arguments) for env in final.all("ENV"))


def test_healthcheck_runs_pgprojector_health_in_exec_form(stages: list[Stage]) -> None:
    healthcheck = stages[-1].last("HEALTHCHECK")
    assert " CMD " in f" {healthcheck.arguments} "
    # --this-host: the container's own daemon, not any daemon on the database (a rolling deploy runs two)
    assert healthcheck.exec_form() == ["pgprojector", "health", "--this-host"]


def _is_command(name: str) -> bool:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([name, "--help"])
    return exited.value.code == 0


def test_every_command_the_container_files_run_exists(stages: list[Stage], capsys: pytest.CaptureFixture[str]) -> None:
    assert _is_command("run") and _is_command("migrate")
    healthcheck = stages[-1].last("HEALTHCHECK").exec_form()
    parsed = build_parser().parse_args(healthcheck[1:])
    assert parsed.command == "health" and parsed.this_host


def test_final_stage_installs_the_builders_wheel_with_metrics(stages: list[Stage]) -> None:
    builder = _builder(stages)
    wheel_dir = _option(shlex.split(_wheel_run(builder).arguments), "--wheel-dir")
    flags, command = _install_run(stages[-1]).flags_and_command()
    mount = dict(part.split("=", 1) for part in flags["mount"].split(","))
    assert (mount["type"], mount["from"], mount["source"]) == ("bind", builder.name, wheel_dir)
    assert f"{mount['target']}/pgprojector-" in command and "[metrics]" in command


def _option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


# --- the Dockerfile's build, replayed -------------------------------------------------------------

def _ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rules, for the patterns we use: a match on the path or any parent; last match wins."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(candidate.rsplit("/", 1)[-1], pattern[3:])
            ):
                ignored = not negate
    return ignored


def _copy_context(stage: Stage, root: Path) -> Path:
    """Carry out the stage's WORKDIR and COPY (from the context, minus .dockerignore) under `root`."""
    patterns = _ignore_patterns()
    workdir = root
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = root / instruction.arguments.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            assert not instruction.arguments.startswith("--"), "only plain COPY is replayed"
            *sources, destination = instruction.arguments.split()
            target = workdir / destination
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: not in the repository"
                assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
                if path.is_dir():
                    for file in path.rglob("*"):
                        relative = file.relative_to(ROOT).as_posix()
                        if file.is_file() and not _ignored(relative, patterns):
                            copied = target / file.relative_to(path)
                            copied.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(file, copied)
                else:
                    copied = target / path.name if destination.endswith("/") else target
                    copied.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, copied)
    return workdir


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "VIRTUAL_ENV", "PGPROJECTOR_"))}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = _ignore_patterns()
    for path in (".venv", ".venv/bin/python", ".git", ".git/HEAD", ".pytest_cache", "tests/conftest.py",
                 "src/pgprojector/__pycache__/cli.cpython-312.pyc"):
        assert _ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "src/pgprojector/cli.py", "sql/migrations/001_event_store.sql",
                 "sql/roles.sql"):
        assert not _ignored(path, patterns), path


def test_the_image_build_replayed_outside_docker(stages: list[Stage], tmp_path: Path) -> None:
    """Builder: the same COPYs and `pip wheel`. Final stage: its own install command, in a fresh venv."""
    image_root = tmp_path / "image"
    builder = _builder(stages)
    workdir = _copy_context(builder, image_root)
    words = shlex.split(_wheel_run(builder).arguments)
    assert words[0] == "python"
    host = [sys.executable, *(str(image_root / w.lstrip("/")) if w.startswith("/") else w for w in words[1:])]
    _run(host, cwd=workdir)
    wheel_dir = image_root / _option(words, "--wheel-dir").lstrip("/")
    (wheel,) = wheel_dir.glob("pgprojector-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"pgprojector/cli.py", "pgprojector/sql/migrations/001_event_store.sql", "pgprojector/sql/queries.sql",
            "pgprojector/sql/roles.sql"} <= names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    flags, command = _install_run(stages[-1]).flags_and_command()
    mount = dict(part.split("=", 1) for part in flags["mount"].split(","))
    command = command.replace(mount["target"], str(image_root / mount["source"].lstrip("/")))
    command = re.sub(r"(?<![\w/.-])python(?= )", shlex.quote(str(python)), command)
    _run(["sh", "-c", command], cwd=tmp_path)

    help_text = _run([str(venv / "bin" / "pgprojector"), "--help"], cwd=tmp_path).stdout
    for subcommand in ("migrate", "run", "status"):
        assert subcommand in help_text
    probe = ("import importlib.resources as r, pgprojector, prometheus_client; "
             "print(pgprojector.__file__); "
             "print(r.files('pgprojector') / 'sql' / 'migrations' / '001_event_store.sql')")
    module_file, migration = _run([str(python), "-c", probe], cwd=tmp_path).stdout.split()
    assert Path(module_file).is_relative_to(venv), "the venv must run the installed wheel, not the checkout"
    assert Path(migration).is_relative_to(venv) and "CREATE TABLE IF NOT EXISTS events" in Path(migration).read_text()


# --- compose.yaml (text checks: no YAML dependency) ----------------------------------------------

def _blocks(text: str) -> dict[str, str]:
    """The unindented keys, each with the text nested under it, dedented."""
    blocks: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        width = len(line) - len(line.lstrip())
        match = re.fullmatch(r"([\w.-]+):\s*(.*)", line.strip())
        if width == 0 and match:
            key = match.group(1)
            blocks[key] = match.group(2) + "\n"
        elif key is not None:
            blocks[key] += line + "\n"
    return {key: textwrap.dedent(block) for key, block in blocks.items()}


def _services() -> dict[str, str]:
    return _blocks(_blocks(COMPOSE.read_text())["services"])


def test_compose_runs_postgres_then_migrate_then_the_daemon() -> None:
    services = _services()
    assert {"postgres", "migrate", "pgprojector"} <= set(services)
    postgres, migrate, daemon = (services[name] for name in ("postgres", "migrate", "pgprojector"))

    assert re.search(r"^image: postgres:15\b", postgres, re.M)
    assert re.search(r"^healthcheck:\n +test: .*pg_isready", postgres, re.M)

    assert re.search(r'^command: \["migrate"\]$', migrate, re.M)
    assert re.search(r"^depends_on:\n +postgres:\n +condition: service_healthy$", migrate, re.M)

    assert re.search(r'^command: \["run"\]$', daemon, re.M)
    assert re.search(r"^depends_on:\n +migrate:\n +condition: service_completed_successfully$", daemon, re.M)
    assert re.search(r"^restart: unless-stopped$", daemon, re.M)
    for service in (migrate, daemon):
        assert re.search(r"^build: \.$", service, re.M)
        assert re.search(r"^environment:\n +PGPROJECTOR_DSN: postgresql://\S+@postgres:5432/\S+$", service, re.M)


# --- systemd unit and its environment file --------------------------------------------------------

def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_is_a_notify_service_with_a_watchdog_and_hardening() -> None:
    service = {key: values[-1] for key, values in _unit()["Service"].items()}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert re.fullmatch(r"\d+s?", service["WatchdogSec"]) and int(service["WatchdogSec"].rstrip("s")) > 0
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecStart"].split()[0].endswith("/pgprojector") and service["ExecStart"].split()[1:] == ["run"]
    assert service["EnvironmentFile"] == "/etc/pgprojector/pgprojector.env"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "", "root", "0")
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this checkout's entry point.
    unit = tmp_path / "pgprojector.service"
    executable = Path(sys.executable).with_name("pgprojector")
    unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={executable}", UNIT.read_text(), flags=re.M))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "pgprojector.service" not in result.stderr, result.stderr


def test_environment_file_documents_every_setting() -> None:
    text = ENV_EXAMPLE.read_text()
    for name in Settings.model_fields:
        assert re.search(rf"^#?PGPROJECTOR_{name.upper()}=", text, re.M), f"PGPROJECTOR_{name.upper()} missing"
    assert re.search(r"^PGPROJECTOR_DSN=postgresql://", text, re.M), "the one required setting is set"
