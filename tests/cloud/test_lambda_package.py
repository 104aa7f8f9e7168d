"""The Lambda zip holds only what the handlers import: stdlib + boto3 come from the runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fluidity.cloud.package import build_package, handler_modules
from fluidity.errors import ConfigError

HEAVY = ("pydantic", "yaml", "cryptography", "h11", "rich", "uvloop")


@pytest.fixture(scope="module")
def package_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lambda") / "fluidity-lambda.zip"
    proc = subprocess.run(
        [sys.executable, "-m", "fluidity", "cloud", "package", "--output", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fluidity/control/lambdas.py" in proc.stdout
    return path


def test_zip_holds_the_handler_and_only_the_project_modules_it_imports(package_zip: Path) -> None:
    names = set(zipfile.ZipFile(package_zip).namelist())
    assert "fluidity/control/lambdas.py" in names
    assert {"fluidity/__init__.py", "fluidity/control/__init__.py"} <= names
    assert all(name.startswith("fluidity/") and name.endswith(".py") for name in names)
    for unwanted in (
        "fluidity/config.py",
        "fluidity/certs.py",
        "fluidity/tls.py",
        "fluidity/cli.py",
    ):
        assert unwanted not in names
    assert not any(
        n.startswith(("fluidity/server/", "fluidity/agent/", "fluidity/cloud/")) for n in names
    )


def test_importing_the_handlers_from_the_zip_pulls_in_no_heavy_dependency(
    package_zip: Path,
) -> None:
    # A clean interpreter (-I: no PYTHON* variables, no user site, no current directory) with the
    # zip first on the path, as in Lambda; boto3 comes from site-packages as from the runtime.
    script = f"""
import json, sys
sys.path.insert(0, {str(package_zip)!r})
before = set(sys.modules)  # what the interpreter itself loaded (site, .pth hooks)
import fluidity.control.lambdas as handlers
for name in ("wake_handler", "sleep_handler", "kill_handler", "status_handler"):
    assert callable(getattr(handlers, name)), name
print(json.dumps({{"file": handlers.__file__, "modules": sorted(set(sys.modules) - before)}}))
"""
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=package_zip.parent,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["file"].startswith(str(package_zip))
    loaded = {name.split(".")[0] for name in report["modules"]}
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    third_party = loaded - set(sys.stdlib_module_names) - {"fluidity", "__main__"}
    allowed = {"boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six"}
    assert third_party <= allowed, third_party - allowed


def test_package_is_reproducible() -> None:
    first, second = build_package(), build_package()
    assert first.data == second.data
    assert first.default_key == f"fluidity/lambda-{first.sha256[:16]}.zip"


def test_a_handler_importing_a_dependency_the_runtime_lacks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "heavy_handler.py").write_text("import yaml\n\ndef handler(e, c):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="import yaml, which the Lambda runtime does not"):
        handler_modules("heavy_handler")
