"""Real Qwen chat templates: ids equal transformers' apply_chat_template, masks cover the replies.

The reference templates are stored under tests/fixtures/chat_templates/ (reference data, not
written here):
- qwen2_5_instruct.jinja: the `chat_template` of Qwen2.5-Instruct's tokenizer_config.json, as
  stored (a JSON string) in a transformers processor test for openbmb/MiniCPM-o-2_6, whose
  language model is Qwen2.5-7B-Instruct (`prepare_processor_dict`); two other published copies
  (a Rust chat-template test and a Python template table) agree with it apart from escaping.
- qwen3.jinja: llama.cpp's `models/templates/Qwen-Qwen3-0.6B.jinja` (read from the
  ye-NX/llama.cpp fork of ggml-org/llama.cpp), the template of the Qwen3 checkpoints.
The reference tokenizer is transformers' fast tokenizer over a directory written from
qwen.tiktoken (`write_hf_tokenizer`) with the template stored next to it.
"""

import json
import shutil
from pathlib import Path

import pytest

from data_prep.chat import encode_chat, format_preference, read_chat_template, set_chat_template
from data_prep.tokenizer import HFTokenizer, QwenTokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
TEMPLATES = {"qwen2_5": "qwen2_5_instruct.jinja", "qwen3": "qwen3.jinja"}
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
EMPTY_THINK = "<think>\n\n</think>\n\n"
IM_END = "<|im_end|>"

SYS = {"role": "system", "content": "Be brief."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
    "single_system": [SYS, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    "multi": [{"role": "user", "content": "Write code"},
              {"role": "assistant", "content": "```py\nprint(1)\n```"},
              {"role": "user", "content": "thanks!"},
              {"role": "assistant", "content": "You're welcome 🙂 日本語"}],
    "multi_system": [SYS, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d e f"},
                     {"role": "user", "content": "g?"}, {"role": "assistant", "content": " leading space"}],
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{family: (transformers reference, our HFTokenizer, QwenTokenizer with the template set)}."""
    pytest.importorskip("blobfile")
    from transformers import AutoTokenizer

    from data_prep.tokenizer import write_hf_tokenizer

    out = {}
    for family, name in TEMPLATES.items():
        d = write_hf_tokenizer(family, tmp_path_factory.mktemp("hf") / family)
        shutil.copy(FIXTURES / name, d / "chat_template.jinja")
        out[family] = (AutoTokenizer.from_pretrained(str(d)), HFTokenizer(d),
                       set_chat_template(QwenTokenizer(family), str(FIXTURES / name)))
    return out


def masked_runs(tok, ids, mask):
    """Decoded text of each maximal run of loss-masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def expected_replies(family, conv):
    """What the model generates for each assistant turn: Qwen3 puts an empty think block before
    the reply that follows the last user turn (and only that one); `<|im_end|>` closes each."""
    last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
    out = []
    for i, m in enumerate(conv):
        if m["role"] == "assistant":
            think = EMPTY_THINK if family == "qwen3" and i > last_user else ""
            out.append(think + m["content"] + IM_END)
    return out


def reference_ids(ref, conv, gen=False):
    return list(ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen, return_dict=False))


@pytest.mark.parametrize("family", sorted(TEMPLATES))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_sft_ids_and_masks_match_template(tokenizers, family, name):
    ref, hf, tik = tokenizers[family]
    conv = CONVERSATIONS[name]
    want = reference_ids(ref, conv)
    for tok in (hf, tik):
        ids, mask = encode_chat(tok, conv)
        assert ids == want
        assert masked_runs(tok, ids, mask) == expected_replies(family, conv)
        # The newline the template writes after each <|im_end|> is in the ids, never a target.
        for i, t in enumerate(ids[:-1]):
            if t == tok.token_to_id(IM_END):
                assert tok.decode([ids[i + 1]]) == "\n" and mask[i + 1] == 0
    text = ref.decode(want)
    has_system = conv[0]["role"] == "system"
    if family == "qwen2_5":
        # The default system prompt is there exactly when the conversation has none.
        assert (QWEN25_SYSTEM in text) == (not has_system)
    else:
        assert "<|im_start|>system" in text if has_system else not text.startswith("<|im_start|>system")


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_generation_prompt_matches_template(tokenizers, family):
    ref, hf, tik = tokenizers[family]
    for conv in CONVERSATIONS.values():
        prompt = conv[:-1]
        for tok in (hf, tik):
            ids, mask = encode_chat(tok, prompt, add_generation_prompt=True)
            assert ids == reference_ids(ref, prompt, gen=True)
            # Earlier assistant turns stay targets (without a think block); the prompt's tail is not.
            assert masked_runs(tok, ids, mask) == expected_replies(family, prompt)
            assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_qwen3_reasoning_is_kept_in_the_last_reply_only(tokenizers):
    ref, hf, _ = tokenizers["qwen3"]
    conv = [{"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]
    ids, mask = encode_chat(hf, conv)
    assert ids == reference_ids(ref, conv)
    # The template drops the reasoning of earlier turns and renders the last one's.
    assert masked_runs(hf, ids, mask) == ["2" + IM_END, "<think>\ntwo and two\n</think>\n\n4" + IM_END]


def test_reply_starting_with_newlines_never_masks_prompt_bytes(tokenizers):
    ref, hf, _ = tokenizers["qwen2_5"]
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nHi there"}]
    ids, mask = encode_chat(hf, conv)
    assert ids == reference_ids(ref, conv)
    [run] = masked_runs(hf, ids, mask)
    assert run.endswith("Hi there" + IM_END) and "assistant" not in run


@pytest.mark.parametrize("family", sorted(TEMPLATES))
@pytest.mark.parametrize("prompt", [
    "What is 7*6?",
    [SYS, {"role": "user", "content": "7*6?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "7*6?"}],
])
def test_preference_pairs_share_the_prompt(tokenizers, family, prompt):
    ref, hf, tik = tokenizers[family]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    for tok in (hf, tik):
        pair = format_preference(tok, prompt, chosen="42", rejected="It is 41.")
        assert pair.prompt_ids == reference_ids(ref, messages, gen=True)
        think = EMPTY_THINK if family == "qwen3" else ""
        for ids, mask, reply in ((pair.chosen_ids, pair.chosen_mask, "42"),
                                 (pair.rejected_ids, pair.rejected_mask, "It is 41.")):
            assert ids == reference_ids(ref, messages + [{"role": "assistant", "content": reply}])
            assert ids[: len(pair.prompt_ids)] == pair.prompt_ids
            assert not any(mask[: len(pair.prompt_ids)])  # earlier assistant turns are context
            assert masked_runs(tok, ids, mask) == [think + reply + IM_END]


def test_template_from_tokenizer_config(tmp_path, tokenizers):
    """Checkpoints ship the template in tokenizer_config.json (a string, or a list of named ones)."""
    ref, hf, _ = tokenizers["qwen2_5"]
    d = hf.path
    text = (FIXTURES / TEMPLATES["qwen2_5"]).read_text()
    target = tmp_path / "tok"
    target.mkdir()
    shutil.copy(d / "tokenizer.json", target / "tokenizer.json")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": text}))
    assert HFTokenizer(target).chat_template == text
    conv = CONVERSATIONS["single"]
    assert encode_chat(HFTokenizer(target), conv)[0] == reference_ids(ref, conv)
    (target / "tokenizer_config.json").write_text(json.dumps(
        {**cfg, "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": text}]}))
    assert read_chat_template(target) == text


def test_chatml_stays_the_default_and_can_be_forced(tokenizers):
    ref, hf, _ = tokenizers["qwen2_5"]
    assert QwenTokenizer("qwen2_5").chat_template is None
    conv = CONVERSATIONS["single"]
    plain = encode_chat(QwenTokenizer("qwen2_5"), conv)
    templated = encode_chat(hf, conv)
    assert plain[0] != templated[0]  # Qwen2.5's default system prompt
    hf_plain = set_chat_template(HFTokenizer(hf.path), "chatml")
    assert encode_chat(hf_plain, conv) == plain
    with pytest.raises(ValueError, match="no such file"):
        set_chat_template(QwenTokenizer("qwen3"), "missing/template.jinja")


def test_sft_and_preference_stages_use_the_template(tokenizers, tmp_path):
    """posttrain.chat_template reaches the stages' data: `auto` picks the directory's template."""
    from megatron_ext.config import Config, ConfigError
    from posttrain.datasets import chat_tokenizer
    from posttrain.rm import pair_items
    from posttrain.sft import encode_rows

    ref, hf, _ = tokenizers["qwen3"]
    cfg = Config()
    cfg.data.tokenizer = str(hf.path)
    tok = chat_tokenizer(cfg)
    conv = CONVERSATIONS["multi_system"]
    [sample] = encode_rows([{"messages": conv}], tok, 128, "rows")
    want = reference_ids(ref, conv)
    assert sample["tokens"][: len(want) - 1].tolist() == want[:-1]
    labels = sample["labels"][sample["loss_mask"] > 0].tolist()
    assert "".join(tok.decode([t]) for t in labels) == "".join(expected_replies("qwen3", conv))
    items = pair_items(tok, [{"prompt": "q", "chosen": "a", "rejected": "b"}], 64, "rows")
    assert tok.decode(items[0]["labels"][items[0]["loss_mask"] > 0].tolist()) == EMPTY_THINK + "a" + IM_END
    cfg.posttrain.chat_template = "chatml"
    assert chat_tokenizer(cfg).chat_template is None
    cfg.posttrain.chat_template = str(tmp_path / "nope.jinja")
    with pytest.raises(ConfigError, match="posttrain.chat_template"):
        chat_tokenizer(cfg)


def test_generate_chat_prompts_use_the_template(tokenizers):
    from tools.generate import chat_prompt_ids

    ref, hf, _ = tokenizers["qwen2_5"]
    msgs = [{"role": "user", "content": "2+3="}]
    assert chat_prompt_ids(hf, ["2+3="]) == [reference_ids(ref, msgs, gen=True)]
    plain = chat_prompt_ids(HFTokenizer(hf.path), ["2+3="], "chatml")
    assert plain == [encode_chat(QwenTokenizer("qwen2_5"), msgs, add_generation_prompt=True)[0]]
