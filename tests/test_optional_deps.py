"""The core install (torch, numpy, safetensors, tqdm, pillow) imports stepcache, samples and caches; scipy,
scikit-learn and matplotlib (extras [eval] / [bench]) are imported only when a feature uses them, and their
absence is one sentence naming the extra."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stepcache.errors import MissingDependencyError, require

SRC = Path(__file__).resolve().parents[1] / "src"
BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("scipy", "sklearn", "matplotlib"):
                raise ImportError(f"blocked {name}")
    sys.meta_path.insert(0, Block())
    sys.path.insert(0, %r)
""") % str(SRC)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_core_runs_without_the_extras():
    res = _run("""
        import torch, stepcache
        from stepcache.cli.main import build_parser
        build_parser()  # every subcommand's options, as `stepcache --help` needs
        m = stepcache.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10)
        out = stepcache.sample(m, torch.randn(1, 4, 8, 8), torch.tensor([1]), num_steps=4, sampler="ddim",
                               policy=stepcache.FORA(2))
        assert out.shape == (1, 4, 8, 8)
        assert not any(k.split(".")[0] in ("scipy", "sklearn", "matplotlib") for k in sys.modules)
        print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_missing_extra_is_one_sentence_naming_it():
    res = _run("""
        import numpy as np
        from stepcache.eval.metrics import frechet_distance
        try:
            frechet_distance(np.zeros(3), np.eye(3), np.ones(3), np.eye(3))
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == ("MissingDependencyError The Frechet distance needs scipy, which is not installed; "
                                  "install it with pip install 'stepcache[eval]'.")


def test_require():
    assert require("numpy", "Anything").__name__ == "numpy"
    with pytest.raises(MissingDependencyError, match=r"needs scikit-learn.*stepcache\[eval\]"):
        require("sklearn.not_a_module_at_all", "The digits data set")
