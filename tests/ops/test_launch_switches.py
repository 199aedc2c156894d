"""The process-wide launch switches (ops/csrc/launch_switch.h, ops/_launch_switch.py): each public
setter / getter / context manager reaches its C++ switch, nests, and restores what was there."""

from __future__ import annotations

import pytest

import ops

# (context manager, getter, setter) of every switch ops exports.
SWITCHES = {
    "pdl": (ops.programmatic_launch, ops.programmatic_launch_enabled, ops.set_programmatic_launch),
    "attention_sm90": (ops.attention_sm90, ops.attention_sm90_enabled, ops.set_attention_sm90),
    "decode_fused_merge": (ops.decode_fused_merge, ops.decode_fused_merge_enabled, ops.set_decode_fused_merge),
}


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_sets_nests_and_restores(name):
    if not ops.extension_available():
        pytest.skip("no extension: the switch is a no-op")
    scoped, enabled, set_enabled = SWITCHES[name]
    before = enabled()
    for wanted in (False, True):
        with scoped(wanted):
            assert enabled() is wanted
            with scoped(not wanted):
                assert enabled() is (not wanted)
            assert enabled() is wanted
    assert enabled() is before
    try:
        set_enabled(not before)
        assert enabled() is (not before)
    finally:
        set_enabled(before)
    assert enabled() is before


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_without_the_extension_reads_off(name, monkeypatch):
    import ops._launch_switch as launch_switch

    monkeypatch.setattr(launch_switch, "extension_available", lambda: False)
    scoped, enabled, set_enabled = SWITCHES[name]
    set_enabled(True)  # nothing to switch: no error, still off
    assert enabled() is False
    with scoped(True):
        assert enabled() is False
