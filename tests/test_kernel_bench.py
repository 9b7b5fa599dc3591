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
    # A device function the kernels call (not inlined) gets properties but no entry or
    # register line: where it spills, it is reported too.
    callee = ("ptxas info    : Function properties for _Z6helperv\n"
              "    8 bytes stack frame, {} bytes spill stores, {} bytes spill loads\n")
    assert len(kernel_bench.ptxas_report(PTXAS_LOG + callee.format(0, 0))) == 2
    *_, (helper, *r3) = kernel_bench.ptxas_report(PTXAS_LOG + callee.format(4, 4))
    assert helper.startswith(("helper", "_Z6helper")) and r3 == [0, 8, 0]


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


# cuobjdump -sass's shape, cut down: a kernel with a loop of 4 instructions (0x0020-0x0050, the
# backward branch included) and an exit, and one without a loop.
SASS = """\
\t\tFunction : _Z16quant_mma_kernelIN3c104HalfELi4ELi2ELi1ELb0ELb0EEvPT_
        /*0000*/                   MOV R1, c[0x0][0x28] ;                         /* 0x00000a00ff017b82 */
        /*0010*/                   LOP3.LUT R2, R2, 0xf000f, R3, 0xf8, !PT ;      /* 0x000f000f02027812 */
        /*0020*/                   HADD2 R4, R2, -R5.H0_H0 ;                       /* 0x8000000502047230 */
        /*0030*/                   HMMA.16816.F32 R8, R12, R4, R8 ;                /* 0x000000040c08723c */
        /*0040*/              @!P0 LOP3.LUT R2, R2, 0xf000f, R3, 0xf8, !PT ;     /* 0x000f000f02028812 */
        /*0050*/              @P1 BRA 0x20 ;                                      /* 0xfffffffc00001947 */
        /*0060*/                   EXIT ;                                          /* 0x000000000000794d */
\t\tFunction : _Z5smallPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;                         /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 BRA 0x30 ;                                      /* 0x0000000000008947 */
        /*0020*/                   EXIT ;                                          /* 0x000000000000794d */
"""


def test_sass_loops_reads_each_kernels_longest_loop_and_its_opcodes(monkeypatch, capsys):
    (mma, n, counts), (small, m, _) = kernel_bench.sass_loops(SASS)
    assert mma.startswith("_Z16quant_mma") and n == 4
    assert counts == {"HADD2": 1, "HMMA": 1, "LOP3": 1, "BRA": 1}       # predicates and modifiers dropped
    assert small == "_Z5smallPf" and m == 0                               # a forward branch is no loop
    name = "void quant_mma_kernel<c10::Half, 4, 2, 1, false, false>(c10::Half*, ...)"
    assert kernel_bench.quant_mma_codes_per_iteration(name) == 1 * 2 * 2 * 32
    assert kernel_bench.quant_mma_codes_per_iteration("void quant_mma_kernel<c10::BFloat16, 8, 1, 2, true, false>") == 64
    assert kernel_bench.quant_mma_codes_per_iteration("void quant_mma_kernel<c10::Half, 16, 2, 1, false, false>") == 32
    assert kernel_bench.quant_mma_codes_per_iteration("void rms_norm_kernel<float>(float*)") is None
    monkeypatch.setattr(kernel_bench.torch.version, "cuda", None)          # a CPU build: one line, exit 2
    assert kernel_bench.main(["sass"]) == 2 and "CUDA build" in capsys.readouterr().err
