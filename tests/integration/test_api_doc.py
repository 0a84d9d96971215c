"""The example of docs/api.md runs as written."""

import re
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "api.md"


def test_the_api_guide_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "api_doc"})
    out = capsys.readouterr().out
    assert "projected error per module:" in out and "added delta-W error" in out
    sizes = [int(x.replace(",", "")) for x in re.search(r"store ([\d,]+) -> ([\d,]+) bytes", out).groups()]
    assert sizes[1] < sizes[0]
