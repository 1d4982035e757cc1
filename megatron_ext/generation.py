"""Sampling continuations from a built Megatron model: KV-cached, batched, under TP / SP / PP.

    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0, greedy=False, seed=0,
                            eos_token_id=None, stop=None)
    out = generate(rt, [[1, 2, 3], [4, 5]], params, decode=None, use_cache=True)
    out.tokens[i]    # generated ids of prompt i (without the prompt), stopped after EOS / a stop string
    out.logprobs[i]  # log-prob of each generated id under the model (temperature 1, no top-p)
    out.finished[i]  # True where the row stopped at an end id or a stop string

`rt` is a training Runtime, its DDP chunks, or bare GPTModel chunks; the call is collective over
the model-parallel group (every TP / PP rank calls it with the same arguments).

KV cache (the default): Megatron-Core's own `StaticInferenceContext` is passed to
`GPTModel.forward` as `inference_context=`. Each attention layer allocates its key/value buffers
[max_sequence_length, batch, groups, head_dim] on first use, writes the new positions at
`sequence_len_offset`, slices the RoPE table to those positions and hands the cached keys/values
to the core attention (the local spec's `CoreAttention` attends the new queries lower-right
causal to them). This loop advances `sequence_len_offset` after every forward; pipeline stages
run through the one forward-only pass (`megatron_ext.forward`), each stage with its own context.
With virtual pipeline stages the interleaved schedule needs PP micro-batches: the batch is split
into PP of them and the context's `batch_size_offset` points each at its rows of the cache.
Sampling (seeded CPU generator) runs on the last stage, which shares the ids with the others.

Prompts of different lengths (Megatron's static-batching scheme, no padding mask needed): the
batch is prefilled with the shortest prompt's length, then advances one position per step for
every row; a row still inside its prompt is fed its next prompt token, the others their sampled
token. Every row therefore sees exactly its own tokens at their own positions, as if run alone.

Sequence parallelism (TP ranks split the sequence): each forward is padded to a multiple of TP.
The padding sits after the real tokens, so causal attention keeps it out of every real token's
view, and the cache entries it writes past `sequence_len_offset` are overwritten by the next
real tokens before anything reads them.

`use_cache=False` recomputes the full sequence for every new token (right-padded, reading each
row's logits at its own last position): the exact path the model trains with, kept as the
reference the cached path is tested against.

Stopping (`SamplingParams`): `eos_token_id` is one id or several (e.g. ChatML's `<|im_end|>`
and `<|endoftext|>`, `chatml_stop_ids(tokenizer)`); `stop` strings need `decode` (ids -> text)
and stop a row once its generated text contains one of them (the ids keep the token that
completed it; cut the text with `cut_at_stop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_ext.forward import eval_mode, forward_only, micro_batch_multiple, share_from_last_stage


@dataclass(frozen=True)
class SamplingParams:
    """How `generate` continues each prompt (one value for the whole batch)."""

    max_new_tokens: int
    """Most ids generated per prompt (>= 1)."""
    temperature: float = 1.0
    """Softmax temperature (>= 0; 0 samples greedily)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of ids whose probability reaches top_p (0 < top_p <= 1)."""
    greedy: bool = False
    """Argmax instead of sampling."""
    seed: int = 0
    """Seed of the sampling generator (the same ids for the same seed at any layout)."""
    eos_token_id: Union[int, Sequence[int], None] = None
    """An id, or several, that end a row (the id is kept); None: none."""
    stop: Optional[Sequence[str]] = None
    """Strings that end a row once its generated text contains one (needs generate's `decode`)."""

    def __post_init__(self):
        # Stored as tuples: the value stays immutable and hashable whatever sequence was given.
        if self.eos_token_id is not None and not isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", tuple(int(i) for i in self.eos_token_id))
        if self.stop is not None:
            if isinstance(self.stop, str):
                raise ValueError(f"SamplingParams.stop must be a list of strings, got the string {self.stop!r}")
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: need temperature >= 0 and 0 < top_p <= 1, "
                             f"got temperature={self.temperature}, top_p={self.top_p}")


@dataclass
class Generation:
    """Generated ids (prompt excluded) and their model log-probs, per prompt."""

    tokens: List[List[int]]
    logprobs: List[List[float]]
    finished: List[bool]
    """True where the row stopped at an end id or a stop string (False: it hit max_new_tokens)."""


def chunks_of(rt_or_model) -> List[torch.nn.Module]:
    model = getattr(rt_or_model, "model", rt_or_model)  # a Runtime carries .model
    return list(model) if isinstance(model, (list, tuple)) else [model]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool,
                generator: torch.Generator) -> torch.Tensor:
    """Next ids [batch] from logits [batch, vocab]: argmax, or temperature + nucleus sampling."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def chatml_stop_ids(tokenizer) -> List[int]:
    """The ids that end a ChatML assistant turn: `<|im_end|>` (and `<|endoftext|>` where known)."""
    ids = [tokenizer.token_to_id("<|im_end|>")]
    try:
        ids.append(tokenizer.token_to_id("<|endoftext|>"))
    except (KeyError, ValueError):
        pass
    return [i for i in ids if i is not None]


def cut_at_stop(text: str, stop: Optional[Sequence[str]]) -> Tuple[str, Optional[str]]:
    """`text` up to (excluding) the earliest stop string, and that string (None if none occurs)."""
    best = None
    for s in stop or ():
        at = text.find(s)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, s)
    return (text, None) if best is None else (text[:best[0]], best[1])


def check_prompts(prompts, vocab: Optional[int] = None) -> None:
    """ValueError unless there are prompts, each with ids (in [0, vocab) where given), and no CP."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: need at least one prompt, and every prompt needs at least one token")
    if vocab is not None and any(t < 0 or t >= vocab for p in prompts for t in p):
        raise ValueError(f"generate: prompt token ids must be in [0, {vocab})")
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError("generate: context parallelism is not supported for sampling (use cp=1)")


def _seq_multiple(chunks) -> int:
    cfg = getattr(chunks[0], "config", None)
    return cfg.tensor_model_parallel_size if cfg is not None and cfg.sequence_parallel else 1


def _device(chunks) -> torch.device:
    for param in chunks[0].parameters():
        return param.device
    return torch.device("cpu")


def padded_batch(chunks, batch: int) -> int:
    """The batch a forward runs: `batch` rounded up to a whole number of micro-batches (one,
    except under virtual pipeline stages: as many as pipeline stages, see megatron_ext.forward)."""
    micro = micro_batch_multiple(chunks)
    return -(-batch // micro) * micro


def forward(chunks: List[torch.nn.Module], tokens: torch.Tensor, context: Optional[StaticInferenceContext] = None,
            offset: int = 0) -> Optional[torch.Tensor]:
    """Full-vocab logits [batch, positions, vocab] on the last pipeline stage (None elsewhere) of
    `tokens` [batch, positions] placed at `offset`; with a context, its KV cache is read and
    written, and (where the context materializes only the last token) one position comes back
    per sequence-parallel rank. Under virtual pipeline stages the batch runs as micro-batches
    (rows past `batch` are padding, the context's batch offset is set per micro-batch)."""
    batch, seq = tokens.shape
    device = _device(chunks)
    micro = micro_batch_multiple(chunks)
    size = padded_batch(chunks, batch) // micro
    if size * micro != batch:
        tokens = torch.cat([tokens, tokens.new_zeros(size * micro - batch, seq)])
    tokens = tokens.to(device)
    positions = (torch.arange(seq, device=device) + offset).unsqueeze(0).expand(size, seq)
    extra = {} if context is None else dict(inference_context=context)

    def step(data_iterator, model):
        i = next(data_iterator)
        if context is not None:
            context.batch_size_offset = i * size  # where this micro-batch's rows sit in the KV cache
        # No loss function: the schedule hands the last stage's raw output back to us.
        return model(tokens[i * size:(i + 1) * size], positions, attention_mask=None, runtime_gather_output=True,
                     **extra), None

    outputs = forward_only(chunks, step, range(micro), seq_length=seq, micro_batch_size=size)
    if context is not None:
        context.reset_batch_size_offset()
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    # Sampling runs on the CPU (its seeded generator is a CPU one), whatever the model's device.
    return torch.cat([o.float() for o in outputs])[:batch].cpu()


class _Stopper:
    """Per-row stop test on the generated ids: end ids, and stop strings on the decoded tail."""

    def __init__(self, eos_token_id, stop, decode):
        if eos_token_id is None:
            eos = []
        elif isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = [int(i) for i in eos_token_id]
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.stop = [s for s in (stop or []) if s]
        if self.stop and decode is None:
            raise ValueError("generate: stop strings need decode= (ids -> text)")
        self.decode = decode
        # A stop string of n characters spans at most 4n byte-level tokens.
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 4

    def __call__(self, out_ids: torch.Tensor, n_new: torch.Tensor, rows: torch.Tensor, nxt: torch.Tensor):
        """Which of `rows` (that just produced `nxt`) stop now."""
        hit = torch.isin(nxt[rows], self.eos) if len(self.eos) else torch.zeros(len(rows), dtype=torch.bool)
        if self.stop:
            for j, i in enumerate(rows.tolist()):
                if not hit[j]:
                    n = int(n_new[i])
                    tail = self.decode(out_ids[i, max(0, n - self.window):n].tolist())
                    hit[j] = any(s in tail for s in self.stop)
        return hit


def generate(rt_or_model, prompts_token_ids: Sequence[Sequence[int]], params: SamplingParams,
             decode: Optional[Callable[[List[int]], str]] = None, use_cache: bool = True) -> Generation:
    """Continue each prompt as `params` say (see the module doc); `decode` (ids -> text) is needed
    for stop strings. Collective over the model-parallel group."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"generate: params must be a SamplingParams, got {type(params).__name__}")
    chunks = chunks_of(rt_or_model)
    check_prompts(prompts_token_ids)
    stopper = _Stopper(params.eos_token_id, params.stop, decode)
    batch = len(prompts_token_ids)
    lengths = torch.tensor([len(p) for p in prompts_token_ids])
    total = int(lengths.max()) + params.max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.long)
    for i, p in enumerate(prompts_token_ids):
        tokens[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    state = _State(batch, params, _device(chunks))
    with eval_mode(chunks):
        (_cached if use_cache else _recompute)(chunks, tokens, lengths, state, stopper)
    counts = state.n_new.tolist()
    return Generation([state.out_ids[i, :counts[i]].tolist() for i in range(batch)],
                      [state.out_lp[i, :counts[i]].tolist() for i in range(batch)], state.done.tolist())


class _State:
    def __init__(self, batch: int, params: SamplingParams, device: torch.device):
        self.device, self.params = device, params
        self.gen = torch.Generator().manual_seed(params.seed)
        self.max_new = params.max_new_tokens
        self.out_ids = torch.zeros(batch, self.max_new, dtype=torch.long)
        self.out_lp = torch.zeros(batch, self.max_new)
        self.done = torch.zeros(batch, dtype=torch.bool)  # stopped at an end id / stop string
        self.n_new = torch.zeros(batch, dtype=torch.long)

    def sample(self, last: Optional[torch.Tensor]):
        """Ids and log-probs [batch] from the last stage's logits [batch, vocab], shared over PP
        (sent on the model's device, as NCCL needs)."""
        batch, p = self.done.shape[0], self.params
        nxt, lp = torch.zeros(batch, dtype=torch.long), torch.zeros(batch)
        if last is not None:  # last pipeline stage
            nxt = sample_next(last, p.temperature, p.top_p, p.greedy, self.gen)
            lp = torch.log_softmax(last, -1).gather(-1, nxt[:, None]).squeeze(-1)
        return share_from_last_stage(nxt, self.device), share_from_last_stage(lp, self.device)

    def record(self, rows: torch.Tensor, nxt, lp, stopper: _Stopper) -> None:
        """Append the sampled ids of `rows` (indices) and mark the rows that stop."""
        cols = self.n_new[rows]
        self.out_ids[rows, cols], self.out_lp[rows, cols] = nxt[rows], lp[rows]
        self.n_new[rows] += 1
        self.done[rows] |= stopper(self.out_ids, self.n_new, rows, nxt)

    def live(self) -> torch.Tensor:
        return ~self.done & (self.n_new < self.max_new)


def _recompute(chunks, tokens, lengths, state: _State, stopper) -> None:
    """Full recompute: every step runs the whole (right-padded) batch from position 0."""
    batch = tokens.shape[0]
    mult = _seq_multiple(chunks)
    for _ in range(state.max_new):
        width = int((lengths + state.n_new).max())
        width = -(-width // mult) * mult
        logits = forward(chunks, tokens[:, :width].contiguous())
        last = None if logits is None else logits[torch.arange(batch), lengths + state.n_new - 1]
        nxt, lp = state.sample(last)
        rows = state.live().nonzero().squeeze(-1)
        tokens[rows, (lengths + state.n_new)[rows]] = nxt[rows]
        state.record(rows, nxt, lp, stopper)
        if not bool(state.live().any()):
            break


def _cached(chunks, tokens, lengths, state: _State, stopper) -> None:
    """KV cache: prefill the shortest prompt's length, then one position per step for every row."""
    batch, total = tokens.shape
    mult = _seq_multiple(chunks)
    context = StaticInferenceContext(padded_batch(chunks, batch), total + mult)
    longest = int(lengths.max())
    # Under SP a forward's length must be a multiple of TP: prefill the largest such prefix.
    pos = int(lengths.min()) // mult * mult
    logits = _cached_forward(chunks, tokens[:, :pos], context, mult) if pos else None
    while True:
        if pos:  # `logits`: the distribution of position `pos`, for every row
            nxt, lp = state.sample(logits)
            rows = (state.live() & (lengths <= pos)).nonzero().squeeze(-1)
            tokens[rows, pos] = nxt[rows]
            state.record(rows, nxt, lp, stopper)
            if not bool(state.live().any()):
                return
        if pos >= longest:
            context.enable_decode_mode()  # every prompt is encoded: generated tokens only from here
        logits = _cached_forward(chunks, tokens[:, pos:pos + 1], context, mult)
        pos += 1


def _cached_forward(chunks, real: torch.Tensor, context: StaticInferenceContext, mult: int) -> Optional[torch.Tensor]:
    """Feed `real` [batch, n] at the context's offset (padded to a multiple of `mult`) and advance
    the offset by n; the logits [batch, vocab] of the last real token on the last stage."""
    n = real.shape[1]
    width = -(-n // mult) * mult
    fed = real if width == n else torch.cat([real, real.new_zeros(real.shape[0], width - n)], dim=1)
    logits = forward(chunks, fed.contiguous(), context, context.sequence_len_offset)
    context.increment_sequence_len_offset(n)
    if logits is None:
        return None
    # Only the last position of each SP rank's slice comes back: [batch, mult, vocab]. The last
    # real token is the last of all when nothing was padded, else (n == 1, width == mult) the first.
    return logits[:, -1] if width == n else logits[:, 0]


class MegatronBackend:
    """A `data_prep.synth.backends.Backend` over our own model (collective over its model-parallel
    group): synthetic data sampled with the same generation as GRPO's rollouts."""

    def __init__(self, model, tokenizer, eos_token_id: Optional[int] = None, top_p: float = 1.0,
                 name: str = "megatron"):
        self.model, self.tokenizer, self.eos_token_id, self.top_p = model, tokenizer, eos_token_id, top_p
        self.name = name

    def complete(self, prompts, n, temperature, max_tokens, seed):
        ids = [self.tokenizer.encode(p) for p in prompts for _ in range(n)]
        params = SamplingParams(max_tokens, temperature=temperature, top_p=self.top_p, greedy=temperature == 0,
                                seed=seed, eos_token_id=self.eos_token_id)
        out = generate(self.model, ids, params)
        texts = [self.tokenizer.decode([t for t in row if t != self.eos_token_id]) for row in out.tokens]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
