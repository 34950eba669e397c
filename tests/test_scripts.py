"""Every script imports and builds its flags without TensorFlow: --help and a bad flag answer at once, and an
import error in a script's module-level code (its flag types, say) fails here, not only in the slow process tests."""
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = ["train", "sample", "sample_server", "evaluate", "export", "plot", "analyze"]
BUILD_PARSER = """
import sys
sys.path.insert(0, sys.argv[1])
module = __import__(sys.argv[2])
print(module.build_parser().format_help())
print("tensorflow" in sys.modules)
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_builds_its_parser_without_importing_tensorflow(script):
    result = subprocess.run([sys.executable, "-c", BUILD_PARSER, REPO, script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    *help_text, tensorflow_loaded = result.stdout.strip().splitlines()
    assert "usage:" in help_text[0] and "--help" in "\n".join(help_text)
    assert tensorflow_loaded == "False"
