"""drive.py's command line: help that answers without importing torch, and that offers only the
flags a command accepts."""
import subprocess
import sys

import pytest

from conftest import ROOT, drive_cli

HEAVY = ("torch", "transformers", "ref_train", "memcheck", "data", "ilora")
# Runs drive.main with argv, then prints which heavy modules were imported by then.
IMPORTED_AFTER_MAIN = f"""
import sys
import drive
try:
    drive.main(sys.argv[1:])
except SystemExit:
    pass
print([m for m in {HEAVY!r} if m in sys.modules])
"""


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in
                                                  ("budget", "ablate", "sweep", "bench", "families", "figures")]],
                         ids=" ".join)
def test_help_imports_nothing_heavy(argv):
    done = subprocess.run([sys.executable, "-c", IMPORTED_AFTER_MAIN, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]", done.stdout


def test_figures_help_offers_only_its_own_flags_and_refuses_others_in_one_line():
    help_text = drive_cli("figures", "--help").stdout
    assert "--all" in help_text and "--only" in help_text
    assert "ref_train.py's" not in help_text and "--bs" not in help_text
    done = drive_cli("figures", "--bs", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["drive.py figures: error: unrecognized arguments: --bs 2"]
