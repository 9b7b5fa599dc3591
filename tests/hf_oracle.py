"""Hugging Face transformers as a test oracle, run in an interpreter of its own.

transformers 5 imports Hugging Face's `kernels` package whenever a module named `kernels`
can be found. With the repository root on sys.path (conftest.py puts it there, and
`python -m pytest` adds the working directory) that module is nanoserve's kernels.py, and
`from transformers import LlamaConfig` raises ImportError. Within one process there is no
order that works: whichever `kernels` is imported first, the other side gets the wrong one.
So a test never imports transformers itself. It hands a function to `run_clean`, which runs
that function's source in a fresh `python -I` (isolated mode: neither the script's directory
nor the working directory nor PYTHONPATH is on sys.path) started in an empty directory, and
returns what the function returned. Arguments and results travel through torch.save files
(tensors, numbers, strings, lists, tuples, dicts), so a reference computed there is compared
here exactly as if it had been computed in the test.
"""

import importlib.util
import inspect
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# Whether transformers is installed; find_spec locates it without importing it.
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

CHILD = """\
import sys

import torch

{source}

args = torch.load(sys.argv[1], weights_only=True)
torch.save({name}(*args), sys.argv[2])
"""


def run_clean(fn: Callable, *args: Any, timeout: float = 600) -> Any:
    """fn(*args) in a clean interpreter (see above) -> its result. fn is a module-level
    function that imports what it uses in its own body. A child that fails fails the
    calling test, with the child's stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "child.py").write_text(CHILD.format(source=textwrap.dedent(inspect.getsource(fn)), name=fn.__name__))
        torch.save(args, d / "args.pt")
        r = subprocess.run([sys.executable, "-I", "child.py", "args.pt", "result.pt"], cwd=d,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            pytest.fail(f"{fn.__name__} failed in its clean interpreter (exit {r.returncode}):\n{r.stderr}",
                        pytrace=False)
        return torch.load(d / "result.pt", weights_only=True)
