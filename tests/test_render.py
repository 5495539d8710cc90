"""Golden tests for the one render path: the text, and exactly which tokens carry loss."""

from __future__ import annotations

import pytest

from habit import models, render
from habit.data import Example, Message, load_examples
from habit.errors import HabitError


@pytest.fixture(scope="module")
def chat_tok(tiny_model):
    return models.load_tokenizer(models.resolve(tiny_model))


@pytest.fixture(scope="module")
def plain_tok(tiny_plain_model):
    return models.load_tokenizer(models.resolve(tiny_plain_model))


def loss_text(enc, tok) -> str:
    return tok.decode([t for t, lossy in zip(enc.ids, enc.loss) if lossy])


def test_text_template_golden(roles_csv, chat_tok):
    table = load_examples(roles_csv, template="<act>: {act}\n<prompt>: {prompt}")
    template = render.choose_template(table, chat_tok)
    assert template == render.Template("text", "<act>: {act}\n<prompt>: ", "prompt")
    ex = table.examples[0]
    enc = render.encode(ex, template, chat_tok, [chat_tok.eos_token_id])
    assert chat_tok.decode(enc.ids) == (
        f"<act>: {ex.fields['act']}\n<prompt>: {ex.fields['prompt']}<|im_end|>")
    # loss on the response and the EOS after it, nothing else
    assert loss_text(enc, chat_tok) == ex.fields["prompt"] + "<|im_end|>"
    assert enc.ids[-1] == chat_tok.eos_token_id and enc.loss[-1]
    n_prompt = len(render.prompt_ids(render.prompt_text(template, chat_tok, ex.fields), template, chat_tok))
    assert not any(enc.loss[:n_prompt]) and all(enc.loss[n_prompt:])


def test_two_column_uses_chat_template_golden(roles_csv, chat_tok):
    table = load_examples(roles_csv)
    template = render.choose_template(table, chat_tok)
    assert template == render.Template("chat", "{act}", "prompt")
    ex = table.examples[1]
    enc = render.encode(ex, template, chat_tok, [chat_tok.eos_token_id])
    assert chat_tok.decode(enc.ids) == (
        f"<|im_start|>user\n{ex.fields['act']}<|im_end|>\n<|im_start|>assistant\n"
        f"{ex.fields['prompt']}<|im_end|>\n")
    # the end-of-turn token is trained; the newline the template writes after it is not
    assert loss_text(enc, chat_tok) == ex.fields["prompt"] + "<|im_end|>"


def test_two_column_without_chat_template_is_labelled(roles_csv, plain_tok):
    table = load_examples(roles_csv)
    template = render.choose_template(table, plain_tok)
    assert template == render.Template("text", "<act>: {act}\n<prompt>: ", "prompt")


def test_train_on_prompt_marks_everything(roles_csv, chat_tok):
    table = load_examples(roles_csv, template="<act>: {act}\n<prompt>: {prompt}")
    template = render.choose_template(table, chat_tok)
    enc = render.encode(table.examples[0], template, chat_tok, [chat_tok.eos_token_id],
                        train_on_prompt=True)
    assert all(enc.loss)


def test_multi_turn_chat_loss_on_every_assistant_turn(chat_tok):
    ex = Example({}, (Message("system", "Be brief."), Message("user", "Hi"),
                      Message("assistant", "Hello."), Message("user", "Bye"),
                      Message("assistant", "Goodbye.")), "chat.jsonl:1")
    template = render.Template("chat", None, None)
    enc = render.encode(ex, template, chat_tok, [chat_tok.eos_token_id])
    assert loss_text(enc, chat_tok) == "Hello.<|im_end|>Goodbye.<|im_end|>"
    assert render.show(enc, chat_tok).count("⟦") == 2


def test_prompt_ids_match_training_prefix(roles_csv, chat_tok):
    """The ids generation feeds the model are exactly the training prefix before the response."""
    table = load_examples(roles_csv)
    template = render.choose_template(table, chat_tok)
    for ex in table.examples:
        enc = render.encode(ex, template, chat_tok, [chat_tok.eos_token_id])
        ids = render.prompt_ids(render.prompt_text(template, chat_tok, ex.fields), template, chat_tok)
        assert list(enc.ids[: len(ids)]) == ids
        assert not any(enc.loss[: len(ids)]) and enc.loss[len(ids)]


def test_messages_data_needs_chat_template(plain_tok):
    table = load_examples(str(__import__("conftest").FIXTURES / "data" / "chat.jsonl"))
    with pytest.raises(HabitError, match="chat template"):
        render.choose_template(table, plain_tok)


def test_encode_all_drops_too_long(roles_csv, chat_tok):
    table = load_examples(roles_csv)
    template = render.choose_template(table, chat_tok)
    lengths = [len(render.encode(e, template, chat_tok, [chat_tok.eos_token_id])) for e in table.examples]
    cut = sorted(lengths)[len(lengths) // 2]
    kept, dropped = render.encode_all(table.examples, template, chat_tok, [chat_tok.eos_token_id], cut)
    assert len(kept) == sum(n <= cut for n in lengths)
    assert len(dropped) == sum(n > cut for n in lengths)
    assert all(where.startswith(roles_csv) for where, _ in dropped)
