"""Generated input for fuzzing what callers send (hypothesis strategies)."""

from __future__ import annotations

from typing import Any


def json_junk() -> Any:
    """Any JSON value, nested a little: what a hostile or broken caller may put in a field."""
    from hypothesis import strategies as st

    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
        ),
        max_leaves=10,
    )
