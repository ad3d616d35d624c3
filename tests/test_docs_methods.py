"""The Python block of docs/forecast-and-dynamic.md runs as written and saves work."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "forecast-and-dynamic.md"


def test_forecast_and_dynamic_example_runs(one_thread):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["stats"].mac_ratio < 1 and namespace["mse"] > 0
