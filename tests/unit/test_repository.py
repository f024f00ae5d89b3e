"""The repository keeps its own rules: CI runs exactly the README's test command, the code passes ruff (the
rules in pyproject.toml, also the pre-commit hook), the README stays a short front page, every console script
speaks one CLI style, and the layering holds (models and data import nothing above them)."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_ci_runs_the_readme_test_command(repo_root):
    readme = (repo_root / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    test_command = [line for line in block.splitlines() if "pytest" in line]
    assert len(test_command) == 1
    ci = (repo_root / ".ci/run").read_text().splitlines()
    assert test_command[0].strip() in [line.strip() for line in ci]


def test_the_code_passes_ruff(repo_root):
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: it comes with the test extra (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "."], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_readme_is_a_front_page(repo_root):
    lines = (repo_root / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: details belong in docs/"
    links = set(re.findall(r"\((docs/[\w-]+\.md)", "\n".join(lines)))
    assert links and all((repo_root / link).exists() for link in links), links


def _console_scripts(repo_root) -> dict[str, str]:
    setup = (repo_root / "setup.py").read_text()
    return dict(re.findall(r'"(vllama-[\w-]+)=vllama_jax\.([\w.]+):\w+"', setup))


def test_every_console_script_uses_absl_flags_in_snake_case(repo_root):
    scripts = _console_scripts(repo_root)
    assert len(scripts) >= 8, scripts
    for name, module in scripts.items():
        source = (repo_root / "vllama_jax" / (module.replace(".", "/") + ".py")).read_text()
        assert "argparse" not in source, f"{name} ({module}): absl flags, not argparse"
        flag_names = re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source)
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in flag_names), (name, flag_names)
        doc = ast.get_docstring(ast.parse(source)) or ""
        assert name in doc, f"{module}'s docstring should show how {name} is run"
        for spelled in re.findall(r"--([a-z][\w-]*)", doc):
            base = spelled.split(".")[0]
            assert "-" not in base, f"{module}'s docstring names the flag --{spelled}: flags are snake_case"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module if node.module != "vllama_jax" else f"vllama_jax.{node.names[0].name}")
    return found


@pytest.mark.parametrize("package,allowed", [("models", {"models", "constants"}), ("data", {"data", "constants"})])
def test_lower_layers_import_nothing_above_them(repo_root, package, allowed):
    for path in (repo_root / "vllama_jax" / package).glob("*.py"):
        inside = {m.split(".")[1] for m in _imports(path) if m.startswith("vllama_jax.")}
        assert inside <= allowed, f"{path.relative_to(repo_root)} imports {sorted(inside - allowed)}"
