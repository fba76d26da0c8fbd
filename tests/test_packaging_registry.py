"""Comfy registry packaging: pyproject fields, requirements in sync, `comfy node validate`."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_lines(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line.replace(" ", "").replace('"', "'") for line in lines if line and not line.startswith("-")}


def test_registry_fields():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert project["name"] == "wan-reward-lora"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["requires-python"] and project["description"]
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    icon = comfy["Icon"].rsplit("/main/", 1)[1]
    assert (ROOT / icon).is_file(), f"Icon URL points to {icon}, which is not in the repository"


def test_dependencies_match_requirements_and_leave_torch_to_comfyui():
    deps = {d.replace(" ", "").replace('"', "'") for d in PYPROJECT["project"]["dependencies"]}
    assert deps == _requirement_lines(ROOT / "requirements.txt")
    names = {re.split(r"[<>=;!~ ]", d)[0].lower() for d in deps}
    assert not names & {"torch", "torchvision", "comfyui-frontend-package"}


def test_lint_keeps_the_registry_security_rules_and_passes():
    """`ruff check .` with pyproject's [tool.ruff] (`./dev.sh lint`, run by CI before the tests) keeps the
    registry's security checks (S102 exec, S307 eval, E702) and no pickle (S301) / shell=True (S602) on
    for every file, and finds nothing."""
    lint = PYPROJECT["tool"]["ruff"]["lint"]
    ignored = set(lint.get("ignore", [])) | {r for rules in lint.get("per-file-ignores", {}).values() for r in rules}
    for rule in ("S102", "S307", "E702", "S301", "S602"):
        assert any(rule.startswith(prefix) for prefix in lint["select"]), f"{rule} is not selected"
        assert not any(rule.startswith(prefix) for prefix in ignored), f"{rule} is ignored"
    if shutil.which("ruff", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("ruff is a test requirement (requirements-dev.txt)")
    result = subprocess.run([str(Path(sys.executable).parent / "ruff"), "check", ".", "--output-format", "concise"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_comfy_node_validate_passes():
    comfy = Path(sys.executable).parent / "comfy"
    result = subprocess.run(
        [str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "validation checks passed" in output, output


def test_publish_workflow_uses_the_registry_action_on_version_changes():
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads "on" as True
    assert triggers["push"]["branches"] == ["main"] and triggers["push"]["paths"] == ["pyproject.toml"]
    steps = workflow["jobs"]["publish-node"]["steps"]
    publish = next(s for s in steps if str(s.get("uses", "")).startswith("Comfy-Org/publish-node-action@"))
    assert publish["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    owner = PYPROJECT["project"]["urls"]["Repository"].split("/")[3]
    assert owner in workflow["jobs"]["publish-node"]["if"]


def test_web_uses_no_deprecated_frontend_shims():
    """scripts/widgets.js is a legacy shim; the panels use the frontend's DOM widget API."""
    for path in (ROOT / "web").glob("*.js"):
        assert "scripts/widgets.js" not in path.read_text(), path.name
