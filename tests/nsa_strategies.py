"""Hypothesis strategies shared by the NSA tests: valid configs built directly, never filtered."""
from hypothesis import strategies as st

from nsa_compile import NSAConfig
from nsa_compile.config import BRANCHES


@st.composite
def nsa_configs(draw, max_stride: int = 8) -> NSAConfig:
    """A valid NSAConfig with small blocks, so short sequences reach every regime (T < l,
    T < l', more blocks than n). d | l, d | l', l <= l', n >= forced blocks."""
    d = draw(st.sampled_from([s for s in (1, 2, 4, 8) if s <= max_stride]))
    l = d * draw(st.integers(1, 4))
    lp = d * draw(st.integers(l // d, l // d + 4))
    initial = draw(st.integers(0, 2))
    local = draw(st.integers(0, 3))
    n = draw(st.integers(max(1, initial + local), initial + local + 4))
    window = draw(st.none() | st.integers(1, 48))
    mask = draw(st.lists(st.booleans(), min_size=3, max_size=3).filter(any))
    branches = tuple(b for b, on in zip(BRANCHES, mask) if on)
    gate = draw(st.just("learned") | st.tuples(
        *[st.floats(0.0, 1.0, allow_nan=False) for _ in branches]))
    compressor = draw(st.sampled_from(["mlp", "mean"]))
    return NSAConfig(compress_block=l, compress_stride=d, select_block=lp, select_count=n,
                     select_initial=initial, select_local=local, window=window,
                     branches=branches, gate=gate, compressor=compressor)
