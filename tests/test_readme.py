"""README.md is a promise: CI (.ci/run) runs exactly the test command it shows."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"The tests:\s*```bash\n(.+?)\n```", text, re.S)
    assert block, "README.md has no ```bash block after 'The tests:'"
    return block.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = [i for i, line in enumerate(lines) if line.startswith("# README's test command")]
    assert marker, ".ci/run lost its '# README's test command' marker"
    assert lines[marker[0] + 1].strip() == _readme_test_command()
