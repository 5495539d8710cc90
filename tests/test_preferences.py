"""Preference data: pairs (prompt/chosen/rejected) and unpaired KTO rows (prompt/completion/label),
as text or chat messages, in the formats habit reads, with one-line errors naming row and field."""

from __future__ import annotations

import json

import pytest

from habit.data import Message, load_preferences
from habit.errors import HabitError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_text_pairs_from_csv(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,chosen,rejected\nLinux Terminal,I want you to act as a terminal.,Sure!\n"
                 "Poet,I want you to act as a poet.,No.\nPoet,I want you to act as a poet.,No.\n")
    table = load_preferences(path)
    assert table.shape == "pairs" and table.text and table.duplicates == 1
    first = table.records[0]
    assert first.chosen.fields == {"prompt": "Linux Terminal", "completion": "I want you to act as a terminal."}
    assert first.rejected.fields["completion"] == "Sure!"
    assert first.where.endswith("p.csv:2")


def test_chat_pairs_from_jsonl(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": "Hello there, how may I assist you on this fine day?"}]
    table = load_preferences(write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows)))
    rec = table.records[0]
    assert not table.text
    assert rec.chosen.messages == (Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."))
    assert rec.rejected.messages[-1].content.startswith("Hello there")


def test_messages_as_json_text_in_a_csv_cell(tmp_path):
    cell = json.dumps([{"role": "user", "content": "Hi"}]).replace('"', '""')
    table = load_preferences(write(tmp_path, "p.csv", f'prompt,chosen,rejected\n"{cell}",Yes,No\n'))
    assert table.records[0].chosen.messages[-1] == Message("assistant", "Yes")


def test_unpaired_labels(tmp_path):
    rows = [{"prompt": "a", "completion": "good", "label": True},
            {"prompt": "a", "completion": "bad", "label": "false"},
            {"prompt": "b", "completion": "ok", "label": 1}]
    table = load_preferences(write(tmp_path, "k.json", json.dumps(rows)))
    assert table.shape == "unpaired"
    assert [r.label for r in table.records] == [True, False, True]
    assert all(r.rejected is None for r in table.records)


@pytest.mark.parametrize("text, needle", [
    ("prompt,chosen\na,b\n", "needs columns prompt, chosen, rejected"),
    ("prompt,chosen,rejected\na,,b\n", ":2: field 'chosen' is empty"),
    ("prompt,chosen,rejected\n,b,c\n", ":2: field 'prompt' is empty"),
    ("prompt,chosen,rejected\na,same,same\n", ":2: 'chosen' and 'rejected' are the same answer"),
    ("prompt,completion,label\na,b,maybe\n", ":2: field 'label' is 'maybe'; expected true or false"),
])
def test_bad_preference_rows(tmp_path, text, needle):
    with pytest.raises(HabitError) as e:
        load_preferences(write(tmp_path, "bad.csv", text))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_json_sides(tmp_path):
    rows = [{"prompt": "a", "chosen": {"x": 1}, "rejected": "b"}]
    with pytest.raises(HabitError, match=r"p.jsonl:1: field 'chosen' holds an object"):
        load_preferences(write(tmp_path, "p.jsonl", json.dumps(rows[0])))
    rows = [{"prompt": "a", "completion": "b", "label": [1]}]
    with pytest.raises(HabitError, match="field 'label' is"):
        load_preferences(write(tmp_path, "k.jsonl", json.dumps(rows[0])))
    rows = [{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "b", "rejected": "c"}]
    with pytest.raises(HabitError, match=r"k2.jsonl:1 \(chosen\): messages\[0\].role is 'assistant' but 'user'"):
        load_preferences(write(tmp_path, "k2.jsonl", json.dumps(rows[0])))
