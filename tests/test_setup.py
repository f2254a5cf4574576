"""A new user's first two commands: .ci/run runs exactly README's "Set up and test" block (less
the GPU-only line), so CI fails whenever README would; every package the code imports at top
level is in requirements.txt, and every oracle the tests import is in requirements-test.txt."""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Set up and test", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines()
            if line.strip() and "-m cuda" not in line]


def ci_commands():
    lines = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")
            and not line.startswith(("set -", "cd "))]


def test_ci_runs_exactly_the_readme_block():
    block = readme_block()
    assert block and block[-1].startswith("python -m pytest"), block
    assert ci_commands() == block


def test_the_readme_block_installs_what_the_tests_import():
    block = " ".join(readme_block())
    for name in ("requirements.txt", "requirements-test.txt"):
        assert f"-r {name}" in block


def requirement_names(name):
    lines = open(os.path.join(ROOT, name)).read().splitlines()
    return {re.split(r"[<>=\[ ]", line)[0].lower() for line in lines
            if line.strip() and not line.startswith("#")}


def imported(paths):
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_requirements_cover_the_imports():
    local = {f[:-3] for folder in (ROOT, os.path.join(ROOT, "tests"))
             for f in os.listdir(folder) if f.endswith(".py")}
    stdlib = set(sys.stdlib_module_names)
    pip_name = {"PIL": "pillow", "yaml": "pyyaml", "nvidia": "nvidia-dali-cuda130"}  # nvidia.dali
    runtime = requirement_names("requirements.txt")
    tests = requirement_names("requirements-test.txt") | runtime
    code = [os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")]
    test_files = [os.path.join(ROOT, "tests", f) for f in os.listdir(os.path.join(ROOT, "tests"))
                  if f.endswith(".py")]
    optional = {"timm", "safetensors", "torchcodec", "tensorboard", "nvidia-dali-cuda130",
                "torch_xla"}
    for name in imported(code) - local - stdlib:
        name = pip_name.get(name, name).lower()
        assert name in runtime or name in optional, f"{name} is imported but not in requirements"
    for name in imported(test_files) - local - stdlib:
        name = pip_name.get(name, name).lower()
        assert name in tests, f"the tests import {name}, missing from requirements-test.txt"
