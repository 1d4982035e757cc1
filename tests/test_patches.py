"""The Megatron-Core correctness patches still match the upstream code they patch."""

import pytest

from megatron_ext import patches


def test_upstream_call_sites_unchanged():
    sites = patches.upstream_call_sites()
    assert sorted(sites) == sorted(p.__name__ for p in patches.PATCHES)
    for name, present in sites.items():
        assert present, f"upstream changed under patch '{name}': re-check megatron_ext/patches.py"


def test_patches_refuse_other_megatron_versions(monkeypatch):
    import megatron.core

    monkeypatch.setattr(patches, "_applied", False)
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match="pinned to megatron-core 0.16.1, found 0.17.0"):
        patches.apply()
