"""tools/kernel_bench.py without a GPU or nvcc: CI's compile check reads ptxas -v's output
and fails on a kernel that spills registers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import kernel_bench  # noqa: E402

# ptxas -v of nvcc 13.0 for sm_90 on two toy kernels, the first limited to 32 registers.
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3bigPfi' for 'sm_90'
ptxas info    : Function properties for _Z3bigPfi
    640 bytes stack frame, 688 bytes spill stores, 1004 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 640 bytes cumulative stack size
ptxas info    : Compile time = 52.568 ms
ptxas info    : Compiling entry function '_Z5smallPf' for 'sm_90'
ptxas info    : Function properties for _Z5smallPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 256 bytes smem
ptxas info    : Compile time = 2.291 ms
"""


def test_ptxas_report_reads_registers_spills_and_shared_memory():
    (big, *r1), (small, *r2) = kernel_bench.ptxas_report(PTXAS_LOG)
    assert big.startswith(("big", "_Z3big")) and r1 == [32, 688 + 1004, 0]
    assert small.startswith(("small", "_Z5small")) and r2 == [10, 0, 256]


def test_compile_check_fails_on_a_spill_and_passes_without_one(monkeypatch, capsys):
    monkeypatch.setattr(kernel_bench.torch.version, "cuda", "13.0")        # as a CUDA build of torch
    monkeypatch.setattr(kernel_bench, "compile_with_ptxas_verbose", lambda: PTXAS_LOG)
    assert kernel_bench.main(["ptxas"]) == 1
    assert "2 kernels, 1 spilling" in capsys.readouterr().out
    no_spill = PTXAS_LOG.replace("688 bytes spill stores, 1004 bytes spill loads", "0 bytes spill stores, 0 bytes spill loads")
    monkeypatch.setattr(kernel_bench, "compile_with_ptxas_verbose", lambda: no_spill)
    assert kernel_bench.main(["ptxas"]) == 0
    monkeypatch.setattr(kernel_bench, "compile_with_ptxas_verbose", lambda: "")
    assert kernel_bench.main(["ptxas"]) == 1                               # no kernel found: a failure too
