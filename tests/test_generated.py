"""What `make install` ships beside the code: the man page and completions (generated from the
parser, committed), the commented config file; and `cl --help` staying light."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from cl import cli
from cl.config import _PARSERS, Config, load_config
from utils import BIN, REPO


def test_the_man_page_and_completions_match_the_parser(tmp_path: Path) -> None:
    subprocess.run(
        ["make", "-s", "-C", str(REPO), "generate", f"GENERATED={tmp_path}"], check=True, capture_output=True
    )
    for generated in ("man/cl.1", "completion/cl", "completion/_cl"):
        fresh, shipped = (tmp_path / generated).read_text(), (REPO / "packaging" / generated).read_text()
        assert fresh == shipped, f"packaging/{generated} is behind the parser: run `make generate`"


def test_the_man_page_has_examples_environment_files_and_every_exit_status() -> None:
    page = (REPO / "packaging" / "man" / "cl.1").read_text()
    sections = re.findall(r"^\.SH (.+)$", page, flags=re.MULTILINE)
    assert {"EXAMPLES", "ENVIRONMENT", "FILES", "EXIT STATUS"} <= set(sections)
    status = page.split(".SH EXIT STATUS", 1)[1]
    codes = {int(code) for code in re.findall(r"^\.B (\d+)$", status, flags=re.MULTILINE)}
    assert codes == {0, *(value for name, value in vars(cli).items() if name.startswith("EXIT_"))}


def test_bash_completion_offers_commands_and_account_actions() -> None:
    script = (
        f"source {REPO}/packaging/completion/cl; COMP_WORDS=(cl accounts ''); COMP_CWORD=2; _shtab_cl;"
        ' echo "${COMPREPLY[*]}"; COMP_WORDS=(cl su); COMP_CWORD=1; _shtab_cl; echo "${COMPREPLY[*]}"'
    )
    shown = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert shown == ["pause resume set", "submit"]


def test_the_shipped_config_shows_every_key_at_its_default(tmp_path: Path) -> None:
    text = (REPO / "packaging" / "config.toml").read_text()
    before_tables = text.split("#[")[0]
    shown = set(re.findall(r"^#(\w+) = ", before_tables, re.MULTILINE)) | set(
        re.findall(r"^#\[(\w+)\.", text, re.MULTILINE)
    )
    assert shown == set(_PARSERS)
    uncommented = re.sub(r"^#(\w+ = )", r"\1", before_tables, flags=re.MULTILINE)
    tomllib.loads(uncommented)  # valid TOML once uncommented
    config = tmp_path / "config.toml"
    config.write_text(uncommented)
    assert load_config({"CL_CONFIG": str(config)}) == Config(config_file=config)


def test_help_and_completion_never_import_the_daemon_code() -> None:
    probe = (
        "import sys\nfrom cl.cli import main\nsys.argv = ['cl', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m == 'cl' or m.startswith('cl.'))), file=sys.stderr)"
    )
    for args in (["--help"], ["accounts", "--help"], ["submit", "--help"]):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True)
        assert result.stderr.split() == [
            "cl",
            "cl.cli",
            "cl.client",
            "cl.config",
            "cl.moments",
            "cl.states",
            "cl.windows",
        ], args
    assert "usage: cl" in subprocess.run([str(BIN / "cl"), "--help"], capture_output=True, text=True, check=True).stdout


def test_the_daemons_never_import_the_worker_process() -> None:
    """The worker module is the worker process alone: the daemons reach it only through the
    launcher (a `cl-worker@` unit, or the fork server's own process)."""
    probe = "import sys, cl.balancer, cl.rescue, cl.metrics; print('cl.worker' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"


def test_without_the_postgresql_extra_every_process_starts() -> None:
    """psycopg comes with `EXTRAS=postgresql` only: no module a daemon or the worker imports at
    start may need it (it is imported where a server is used)."""
    probe = (
        "import sys; sys.modules['psycopg'] = sys.modules['psycopg_pool'] = None\n"
        "import cl.balancer, cl.rescue, cl.metrics, cl.gateway.main, cl.worker, cl.cli"
    )
    subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
