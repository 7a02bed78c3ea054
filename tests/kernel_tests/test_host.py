"""The launchers' plain-Python integer helpers give Triton's own answers."""
import pytest

from nsa_compile.kernels.host import cdiv, next_pow2

triton = pytest.importorskip("triton")


def test_cdiv_and_next_pow2_match_triton():
    for x in list(range(0, 300)) + [2 ** 31 - 1, 2 ** 31, 3 * 2 ** 40 + 1]:
        assert next_pow2(x) == triton.next_power_of_2(x), x
        for y in (1, 2, 3, 16, 17, 64, 1000):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
