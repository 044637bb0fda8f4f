"""The package's annotations hold (mypy --strict, configured in pyproject.toml), and so do the README's
example projection's against them: users type-check their projections against this API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _mypy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(cwd / ".mypy_cache"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=240, check=False)


def test_the_package_type_checks(tmp_path):
    result = _mypy(str(ROOT / "src"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_the_readmes_example_projection_type_checks(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = readme.split("## Writing a projection", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "projections.py").write_text(example)
    result = _mypy("myapp/projections.py", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 1 source file" in result.stdout
