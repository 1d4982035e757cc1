"""Qwen tokenizers: pinned ids, special ids, HF tokenizer.json parity, ChatML against transformers."""

import pytest

from data_prep.tokenizer import HFTokenizer, QwenTokenizer, get_tokenizer, write_hf_tokenizer

# The plain ChatML template (what Qwen's templates render for system/user/assistant turns).
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEXTS = [
    "Hello world",
    "def f(x):\n    return x ** 2  # square\n",
    "日本語のテキストと中文混合 🙂👍🏽",
    "numbers 1234567 and 3.14159, URLs https://example.com/a?b=c",
    "a literal <|im_end|> stays text",
    "\n\n  \t mixed whitespace \r\n",
]

CONVERSATIONS = [
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "```py\nprint(1)\n```"},
     {"role": "user", "content": "\nthanks!"}, {"role": "assistant", "content": "\n\nYou're welcome 🙂"}],
    [{"role": "user", "content": "  spaces  "}, {"role": "assistant", "content": " leading space"}],
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("blobfile")
    return write_hf_tokenizer("qwen3", tmp_path_factory.mktemp("hf") / "qwen3")


@pytest.fixture(scope="module")
def hf_reference(hf_dir):
    """transformers' own fast tokenizer over the converted directory (the reference)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def hf_ours(hf_dir):
    return HFTokenizer(hf_dir)


def test_known_ids():
    tok = get_tokenizer("qwen2")
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("\n") == [198]
    assert [tok.encode(r) for r in ("system", "user", "assistant")] == [[8948], [872], [77091]]
    assert tok.decode([9707, 1879]) == "Hello world"


@pytest.mark.parametrize("family,vocab", [("qwen2", 151646), ("qwen2_5", 151665), ("qwen3", 151669)])
def test_special_ids(family, vocab):
    tok = get_tokenizer(family)
    assert tok.vocab_size == vocab
    assert (tok.eod, tok.pad) == (151643, 151643)
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [151643, 151644, 151645]
    if family == "qwen3":
        assert tok.token_to_id("<think>") == 151667
        assert tok.token_to_id("</think>") == 151668
    else:
        with pytest.raises(KeyError):
            tok.token_to_id("<think>")
    # Document text never produces control ids, even when it spells one.
    assert 151645 not in tok.encode("<|im_end|>")


def test_aliases_and_unknown_name():
    assert get_tokenizer("Qwen2.5").family == "qwen2_5"
    assert get_tokenizer("qwen-3").family == "qwen3"
    with pytest.raises(ValueError, match="unknown tokenizer 'llama'"):
        get_tokenizer("llama")


def test_hf_directory_matches_tiktoken(hf_dir, hf_reference):
    ours, hf_dir_tok = QwenTokenizer("qwen3"), get_tokenizer(str(hf_dir))
    assert isinstance(hf_dir_tok, HFTokenizer)
    reference = hf_reference
    assert (hf_dir_tok.vocab_size, hf_dir_tok.eod) == (ours.vocab_size, ours.eod)
    assert hf_dir_tok.token_to_id("</think>") == 151668
    for text in TEXTS:
        ids = ours.encode(text)
        if "<|" not in text:  # transformers splits special-token strings out of text by design
            assert reference(text, add_special_tokens=False).input_ids == ids, text
        assert hf_dir_tok.encode(text) == ids, text
        assert hf_dir_tok.decode(ids) == text
    assert hf_dir_tok.encode_batch(TEXTS) == ours.encode_batch(TEXTS)


def test_missing_hf_directory_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_chat_ids_match_transformers_template(hf_reference, hf_ours, conv):
    reference = hf_reference
    for gen in (False, True):
        msgs = conv[:-1] if gen else conv
        want = reference.apply_chat_template(msgs, chat_template=CHATML, tokenize=True,
                                             add_generation_prompt=gen, return_dict=False)
        for tok in (QwenTokenizer("qwen3"), hf_ours):
            ids, mask = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            assert ids == list(want)
            assert len(mask) == len(ids)


def _unpack(data: bytes, lengths) -> list:
    import numpy as np

    flat, out, at = np.frombuffer(data, dtype=np.uint32).tolist(), [], 0
    for n in lengths.tolist():
        out.append(flat[at:at + n])
        at += n
    assert at == len(flat)
    return out


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_encode_packed_is_encode_per_text(family, monkeypatch):
    """The dataset writer's path (tiktoken's buffer call, or the public encode_to_numpy where
    that is missing) gives `encode`'s ids per text; special-token strings stay text."""
    import data_prep.tokenizer as tk

    tok = get_tokenizer(family)
    texts = TEXTS + ["<|endoftext|><|im_start|>x", "y" * 20_000]
    want = [tok.encode(t) for t in texts]
    assert tk._raw_buffer_encoder(tok._enc) is not None  # this tiktoken has the fast call
    fast = tok.encode_packed(texts)
    assert _unpack(*fast) == want
    assert _unpack(*tok.encode_packed(texts, tok.eod)) == [ids + [tok.eod] for ids in want]
    assert tok.encode_packed([])[0] == b"" and len(tok.encode_packed([], tok.eod)[1]) == 0
    monkeypatch.setattr(tk, "_raw_buffer_encoder", lambda enc: None)
    slow = tok.encode_packed(texts)
    assert slow[0] == fast[0] and slow[1].tolist() == fast[1].tolist()


def test_hf_encode_packed(hf_ours):
    ours = QwenTokenizer("qwen3")
    data, lengths = hf_ours.encode_packed(TEXTS, 7)
    assert _unpack(data, lengths) == [ours.encode(t) + [7] for t in TEXTS]


def test_buffer_call_that_disagrees_is_not_used():
    """A tiktoken whose private buffer call is missing, takes other arguments or gives other
    ids than `encode_ordinary` falls back to the public call."""
    import numpy as np

    import data_prep.tokenizer as tk

    real = get_tokenizer("qwen2")._enc

    class Core:
        def __init__(self, fn):
            self.encode_to_tiktoken_buffer = fn

    class Enc:
        def __init__(self, core):
            self._core_bpe = core

        encode_ordinary = staticmethod(real.encode_ordinary)

    def off_by_one(text, allowed):
        return (np.asarray(real.encode_ordinary(text), dtype=np.uint32) + 1).tobytes()

    def wrong_width(text, allowed):
        return np.asarray(real.encode_ordinary(text), dtype=np.uint64).tobytes()

    def other_signature(text):
        return b""

    good = Enc(Core(lambda text, allowed: np.asarray(real.encode_ordinary(text), dtype=np.uint32).tobytes()))
    assert tk._raw_buffer_encoder(good) is not None
    for fn in (off_by_one, wrong_width, other_signature):
        assert tk._raw_buffer_encoder(Enc(Core(fn))) is None, fn.__name__
    assert tk._raw_buffer_encoder(Enc(None)) is None
