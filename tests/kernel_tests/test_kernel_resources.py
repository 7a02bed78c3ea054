"""The kernel resource report (`kernel_resources.py`): its SASS loop census, and one kernel
reported end to end (recorded in the interpreter, compiled for sm_90 on this machine)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))
import kernel_resources  # noqa: E402

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/                   LDL R2, [R1] ;
.L_x_1:
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R3], R4 ;
        /*0040*/               @!P0 BRA `(.L_x_1) ;
        /*0050*/                   STL [R1], R2 ;
        /*0060*/                   FMUL R5, R5, R6 ;
        /*0070*/                   FMUL R5, R5, R6 ;
        /*0080*/                   FMUL R5, R5, R6 ;
        /*0090*/                   FMUL R5, R5, R6 ;
        /*00a0*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*00b0*/                @P1 BRA `(.L_x_0) ;
        /*00c0*/                @P2 BRA `(.L_x_2) ;
        /*00d0*/                   EXIT ;
.L_x_2:
        /*00e0*/                   BRA `(.L_x_2) ;
"""


def test_innermost_loops_count_a_loops_mmas_and_spills():
    # the outer loop holds the 2-instruction poll loop only, which does not count as a loop;
    # the forward branch and the trailing self-loop are not loop bodies worth reporting
    assert kernel_resources.innermost_loops(SASS) == [(11, 2, 1, 1)]


def test_report_of_one_kernel_end_to_end():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, kernel_resources.__file__, "--groups", "16/1",
                          "--kernels", "nsa_dense_bwd_dq"], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if "nsa_dense_bwd_dq_kernel" in line]
    assert len(rows) == 2  # the compressed and the window branch's launches
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == "16/1" and int(cells[4]) > 0  # registers, from ptxas
        assert "(" in cells[6]  # a loop with its counts
        assert cells[7] in ("", "serialised")
