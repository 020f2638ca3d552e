"""``hanorec.losses`` must stand alone: importing it loads torch and nothing heavy."""

import subprocess
import sys


def test_losses_imports_without_transformers_peft_accelerate() -> None:
    """A fresh interpreter imports hanorec.losses; none of the three heavy packages get loaded."""
    code = (
        "import hanorec.losses, sys; "
        "heavy = [m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
