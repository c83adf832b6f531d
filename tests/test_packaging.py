"""The layout promises: collision-free import names, and CI running the README's test command verbatim."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_and_policies_ship_inside_kvtier(tmp_path):
    import kvtier.kernels
    import kvtier.policies

    assert Path(kvtier.kernels.__file__).parent == ROOT / "kernels"
    assert Path(kvtier.policies.__file__).parent == ROOT / "policies"
    # outside the source tree, the installed package must not provide top-level `kernels` or `policies`
    probe = "import importlib.util as u; print([str(getattr(u.find_spec(n), 'origin', None)) for n in ('kernels', 'policies')])"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(ROOT) not in found.stdout, found.stdout


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert len(commands) == 2, commands
    demo, tests = commands
    assert demo.endswith("python -m kvtier.demo") and tests.endswith("python -m pytest -q")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
