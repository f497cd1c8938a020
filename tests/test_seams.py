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


def test_an_engine_imports_nothing_when_it_is_freed():
    """DeepSpeedEngine.__del__ -> destroy() imports deepspeed.module_inject.auto_ep_comm
    (deepspeedai/DeepSpeed#8213). Freed by the garbage collector in a daemon thread that exit
    then stopped mid-import, it left the module's import lock held, and the other engine's
    __del__ in the main thread waited for it forever (a finished run hung at exit, seen once
    in four runs of a tracking test on a busy machine). pipeline.engines imports it up front,
    so __del__ only looks it up. Checked in a fresh interpreter, where nothing else did."""
    import subprocess
    import sys

    probe = "import sys, pipeline.engines; print('deepspeed.module_inject.auto_ep_comm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "True", result.stderr[-2000:]
