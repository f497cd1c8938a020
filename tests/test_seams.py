"""The module boundaries that keep a DeepSpeed upgrade to one file."""

import re

from tests.conftest import REPO

DEEPSPEED_NAMES = re.compile(r"mp_rank|zero_pp_rank|import deepspeed|from deepspeed")


def test_only_engines_imports_deepspeed_or_knows_its_files():
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "pipeline").rglob("*.py"))
        if path.name != "engines.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if DEEPSPEED_NAMES.search(line)
    ]
    assert offenders == []
