"""The Python blocks of docs/writing-a-policy.md run as written."""

import re
from pathlib import Path

from stepcache.core import policy

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-policy.md"


def test_writing_a_policy_example_runs(one_thread):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    try:
        for code in blocks:
            exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    finally:  # keep the example out of the registry the other tests read
        cls = namespace.get("Extrapolate")
        if cls is not None:
            policy._BY_NAME.pop(cls.method, None)
            policy._HANDLERS.pop(cls, None)
    assert namespace["stats"].nfe == 12
