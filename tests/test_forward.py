"""megatron_ext.forward: the one forward-only pass, the eval-mode guard, sharing from the last
pipeline stage.

Under virtual pipeline stages (PP=2, VPP=2, 2 ranks) a pass over 3 micro-batches runs 4 (the
interleaved schedule needs a multiple of PP) and must return exactly the 3 real ones, in order,
each equal to that micro-batch's output when it runs alone; caller iterators are read exactly
`count` times; the last stage's tensor or object reaches every stage.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.forward import eval_mode
from tests.forked_ranks import run_on_ranks

SEQ = 8


def test_eval_mode_restores_each_chunks_mode_after_an_exception():
    chunks = [torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)]
    chunks[1].eval()
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(chunks):
            assert not any(c.training for c in chunks)
            raise RuntimeError("inside")
    assert [c.training for c in chunks] == [True, False]


def _vpp_pass(rank, world):
    from megatron.core import parallel_state

    from megatron_ext.build import build_model, init_parallel
    from megatron_ext.cli import load_config
    from megatron_ext.forward import forward_only, micro_batch_multiple, share_from_last_stage
    from megatron_ext.transformer import transformer_config

    cfg = load_config(["model=qwen2_debug", "parallel.pp=2", "parallel.vpp=2", f"data.seq_length={SEQ}",
                       "train.micro_batch_size=1", "train.global_batch_size=2"])
    init_parallel(cfg)
    chunks = build_model(cfg, transformer_config(cfg))
    gen = torch.Generator().manual_seed(0)
    batches = [{"id": k, "tokens": torch.randint(0, 200, (1, SEQ), generator=gen)} for k in range(3)]
    positions = torch.arange(SEQ).unsqueeze(0)

    def raw(data_iterator, model):
        b = next(data_iterator)
        return model(b["tokens"], positions, attention_mask=None), None

    def reported(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], positions, attention_mask=None)
        return out, lambda output: (output.sum() * 0, torch.tensor(1), {"id": torch.tensor(b["id"])})

    shape = dict(seq_length=SEQ, micro_batch_size=1)
    with eval_mode(chunks):
        together = forward_only(chunks, raw, batches, **shape)
        alone = [forward_only(chunks, raw, [b], **shape) for b in batches]
        ids = [int(r["id"]) for r in forward_only(chunks, reported, batches, **shape)]
        sources = [iter(batches + ["never read"]) for _ in chunks]
        from_iterators = forward_only(chunks, raw, iterators=sources, count=3, **shape)
        left = [next(s) for s in sources]
    try:
        forward_only(chunks, raw, iterators=iter(batches), count=3, **shape)
        one_iterator = None
    except ValueError as e:
        one_iterator = str(e)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    shared = share_from_last_stage(torch.full((3,), float(rank)))
    obj = share_from_last_stage({"rank": rank} if last else None)
    return dict(last=last, multiple=micro_batch_multiple(chunks), n=len(together), ids=ids, left=left,
                same_alone=all(torch.equal(t, a[0]) for t, a in zip(together, alone)),
                same_iterators=all(torch.equal(t, i) for t, i in zip(together, from_iterators)),
                differ=len(together) == 3 and not torch.equal(together[0], together[1]),
                one_iterator=one_iterator, shared=shared.tolist(), obj=obj)


def test_virtual_pipeline_pass_drops_the_padding_and_shares_from_the_last_stage():
    first, last = run_on_ranks(_vpp_pass, 2)
    assert (first["last"], last["last"]) == (False, True)
    assert first["multiple"] == last["multiple"] == 2
    assert first["n"] == 0 and first["ids"] == []  # only the last stage gets outputs
    assert last["n"] == 3 and last["ids"] == [0, 1, 2]  # the 4th (padding) micro-batch is dropped
    assert last["same_alone"] and last["same_iterators"] and last["differ"]
    assert first["left"] == last["left"] == ["never read", "never read"]  # exactly `count` read per chunk
    assert "one iterator per chunk" in first["one_iterator"]
    assert first["shared"] == last["shared"] == [1.0, 1.0, 1.0]
    assert first["obj"] == last["obj"] == {"rank": 1}
