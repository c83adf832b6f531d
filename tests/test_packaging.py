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
    probe = "import importlib.util as u; print(*[getattr(u.find_spec(n), 'origin', None) for n in ('kernels', 'policies')])"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    for origin in found.stdout.split():  # None, or another package's (Hugging Face's kernels, in the environment)
        assert not Path(origin).is_relative_to(ROOT / "kernels") and not Path(origin).is_relative_to(ROOT / "policies")


def test_from_the_repository_root_kernels_is_the_hugging_face_package():
    """The README runs `python -m ...` from the repository root, which puts the root (and its kernels/ folder) first
    on sys.path; transformers (5.25 and later) imports the Hugging Face `kernels` package as the model loads."""
    probe = ("import importlib.metadata as m, kernels, transformers; from transformers import AttentionInterface; "
             "installed = any(d.metadata['Name'] == 'kernels' for d in m.distributions()); "
             "print(installed, kernels.__file__)")
    found = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-2000:]
    installed, origin = found.stdout.split(maxsplit=1)
    if installed == "True":  # the Hugging Face package, not the folder
        assert not Path(origin.strip()).is_relative_to(ROOT / "kernels"), origin
    else:  # the folder, as an empty module: transformers finds no version and uses no hub kernels
        assert Path(origin.strip()) == ROOT / "kernels" / "__init__.py", origin


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert len(commands) == 2, commands
    demo, tests = commands
    assert demo.endswith("python -m kvtier.demo") and tests.endswith("python -m pytest -q")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
