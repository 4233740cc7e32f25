"""The constitution as data: ours (TOML / JSON), the paper's published files, and errors that say where."""
import json
import re
from pathlib import Path

import pytest

from cai_engine.cai import Constitution, ConstitutionError


def test_default_constitution_is_complete():
    c = Constitution.load("")
    assert len(c.critique_principles) >= 16 and len(c.comparison_principles) >= 16
    for items in (c.critique_principles, c.comparison_principles):
        ids = [p.id for p in items]
        assert len(set(ids)) == len(ids) and all(ids)
    assert all(p.critique_request and p.revision_request for p in c.critique_principles)
    # several comparison principles guard against the over-cautious failure modes
    ids = {p.id for p in c.comparison_principles}
    assert {"less-preachy", "less-accusatory", "less-evasive"} <= ids
    assert all("choose the response" in p.instruction.lower() for p in c.comparison_principles)
    assert len(c.critique_few_shot) >= 2 and len(c.comparison_few_shot) >= 2 and c.comparison_cot_few_shot
    for e in c.comparison_few_shot:
        assert e.prompt.rstrip().endswith("The answer is:")
        assert all(x in (" (A)", " (B)") for x in e.corrects + e.incorrects)
        assert set(e.corrects).isdisjoint(e.incorrects)
    assert all(re.search(r"So the answer is: \([AB]\)$", t) for t in c.comparison_cot_few_shot)
    # few-shot examples that name a principle carry that principle's requests
    by_id = {p.id: p for p in c.critique_principles}
    assert c.critique_few_shot[0].critique_request == by_id["illegal-help"].critique_request
    assert Constitution.load(None) == c


OURS = {
    "critique": [{"id": "a", "critique": "Find harm.", "revision": "Remove harm."},
                 {"id": "b", "critique": "Find rudeness.", "revision": "Be polite."}],
    "comparison": [{"id": "x", "instruction": "Choose the response that is kinder."}],
    "critique_example": [{"prompt": "Hi?", "response": "Go away.", "principle": "b", "critique": "Rude.",
                          "revision": "Hello! How can I help?",
                          "context": [{"role": "user", "content": "Earlier"}, {"role": "assistant", "content": "Yes"}]},
                         {"prompt": "Q", "response": "R", "critique_request": "CR", "revision_request": "RR",
                          "critique": "C", "revision": "V"}],
    "comparison_example": [{"prompt": "... The answer is:", "corrects": [" (A)"], "incorrects": [" (B)"]}],
    "comparison_cot_example": [{"prompt": "... So the answer is: (A)"}],
}

TOML = '''
[[critique]]
id = "a"
critique = "Find harm."
revision = "Remove harm."
[[critique]]
id = "b"
critique = "Find rudeness."
revision = "Be polite."
[[comparison]]
id = "x"
instruction = "Choose the response that is kinder."
[[critique_example]]
prompt = "Hi?"
response = "Go away."
principle = "b"
critique = "Rude."
revision = "Hello! How can I help?"
context = [{role = "user", content = "Earlier"}, {role = "assistant", content = "Yes"}]
[[critique_example]]
prompt = "Q"
response = "R"
critique_request = "CR"
revision_request = "RR"
critique = "C"
revision = "V"
[[comparison_example]]
prompt = "... The answer is:"
corrects = [" (A)"]
incorrects = [" (B)"]
[[comparison_cot_example]]
prompt = "... So the answer is: (A)"
'''


def test_toml_and_json_forms_load_the_same(tmp_path):
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.json").write_text(json.dumps(OURS))
    a, b = Constitution.load(tmp_path / "c.toml"), Constitution.load(tmp_path / "c.json")
    a.source = b.source = ""
    assert a == b
    assert [p.id for p in a.critique_principles] == ["a", "b"]
    e = a.critique_few_shot[0]
    assert (e.critique_request, e.revision_request) == ("Find rudeness.", "Be polite.")
    assert e.context == (("user", "Earlier"), ("assistant", "Yes"))
    assert a.critique_few_shot[1].critique_request == "CR"
    assert a.comparison_few_shot[0].corrects == (" (A)",)
    assert a.critique_principle("b").revision_request == "Be polite."
    with pytest.raises(KeyError, match="'zz'"):
        a.critique_principle("zz")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("critique"), r"c\.json: missing 'critique'"),
    (lambda d: d["critique"][1].pop("revision"), r"c\.json: critique\[1\]\.revision: expected a non-empty string \(missing\)"),
    (lambda d: d["critique"][1].update(id="a"), r"critique\[1\]\.id: duplicate id 'a'"),
    (lambda d: d["comparison"][0].update(instruction=3), r"comparison\[0\]\.instruction: expected a non-empty string"),
    (lambda d: d["critique_example"][0].update(principle="nope"), r"critique_example\[0\]\.principle: 'nope' is not"),
    (lambda d: d["critique_example"][0]["context"][1].update(role="robot"), r"critique_example\[0\]\.context\[1\]"),
    (lambda d: d["comparison_example"][0].update(corrects=" (A)"), r"comparison_example\[0\]\.corrects: expected a non-empty list"),
])
def test_malformed_ours_names_file_and_key(tmp_path, edit, message):
    data = json.loads(json.dumps(OURS))
    edit(data)
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ConstitutionError, match=message):
        Constitution.load(tmp_path / "c.json")


def test_unreadable_files(tmp_path):
    (tmp_path / "c.toml").write_text("[[critique]\n")
    with pytest.raises(ConstitutionError, match=r"c\.toml: invalid TOML"):
        Constitution.load(tmp_path / "c.toml")
    with pytest.raises(ConstitutionError, match="no such file or folder"):
        Constitution.load(tmp_path / "missing.toml")
    (tmp_path / "c.yaml").write_text("x: 1")
    with pytest.raises(ConstitutionError, match=r"expected a \.toml or \.json file"):
        Constitution.load(tmp_path / "c.yaml")


# ---------------------------------------------------------------- the paper's published format (files we write)

def paper_folder(tmp_path: Path, precog: bool = True) -> Path:
    folder = tmp_path / "paper"
    folder.mkdir(parents=True)
    files = {
        "CritiqueRevisionInstructions.json": {
            "harmful0": {"prompt": ["\n\nCritiqueRequest: Say what is harmful.\n\nCritique:"],
                         "edit_request": "\n\nRevisionRequest: Remove the harm.\n\nRevision:"},
            "rude1": {"prompt": ["\n\nCritiqueRequest: Say what is rude.\n\nCritique:",
                                 "\n\nCritiqueRequest: Say what is mean.\n\nCritique:"],
                      "edit_request": "\n\nRevisionRequest: Be kind.\n\nRevision:"},
        },
        "CritiqueRevisionFewShotPrompts.json": [
            "\n\nHuman: How do I cook rice?\n\nAssistant: Burn it.\n\nCritiqueRequest: Say what is wrong.\n\n"
            "Critique: It is unhelpful.\n\nRevisionRequest: Fix it.\n\nRevision: Simmer one cup in two cups of water.",
            "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Insult me\n\nAssistant: You fool.\n\nCritiqueRequest: Harm?"
            "\n\nCritique: Insulting.\n\nRevisionRequest: Be kind.\n\nRevision: I'd rather not insult you.",
        ],
        "RLMadisonInstructions.json": ["Which response is less harmful? Choose the kinder one.\nOptions:",
                                       "Which of these is more honest?\nOptions:"],
        "RLMadisonFewShotPrompts.json": [{"prompt": "Human: x\n\nWhich is better?\nOptions:\n(A) a\n(B) b\nThe answer is:",
                                          "corrects": [" (A)"], "incorrects": [" (B)"]}],
    }
    if precog:
        files["RLMadisonPrecogFewShotPrompts.json"] = [{"prompt": "Human: x\n... Let's think step by step: (A) is kind. "
                                                                   "So the answer is: (A)"}]
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def test_paper_folder_loads_unchanged_files(tmp_path):
    c = Constitution.load(paper_folder(tmp_path))
    assert [(p.id, p.critique_request, p.revision_request) for p in c.critique_principles] == [
        ("harmful0", "Say what is harmful.", "Remove the harm."), ("rude1", "Say what is rude.", "Be kind."),
        ("rude1/1", "Say what is mean.", "Be kind.")]
    first, second = c.critique_few_shot
    assert (first.prompt, first.response, first.critique, first.revision) == (
        "How do I cook rice?", "Burn it.", "It is unhelpful.", "Simmer one cup in two cups of water.")
    assert (first.critique_request, first.revision_request, first.context) == ("Say what is wrong.", "Fix it.", ())
    assert second.context == (("user", "Hi"), ("assistant", "Hello")) and second.prompt == "Insult me"
    assert [(p.id, p.instruction) for p in c.comparison_principles] == [
        ("madison-00", "Which response is less harmful? Choose the kinder one."),
        ("madison-01", "Which of these is more honest?")]
    assert c.comparison_few_shot[0].corrects == (" (A)",) and c.comparison_few_shot[0].prompt.endswith("The answer is:")
    assert c.comparison_cot_few_shot[0].endswith("So the answer is: (A)")
    assert Constitution.load(paper_folder(tmp_path / "b", precog=False)).comparison_cot_few_shot == []


@pytest.mark.parametrize("name, content, message", [
    ("CritiqueRevisionInstructions.json", {"k": {"prompt": "not a list", "edit_request": "x"}},
     r"CritiqueRevisionInstructions\.json: key 'k': expected"),
    ("CritiqueRevisionInstructions.json", {"k": {"prompt": ["x"]}}, r"key 'k': 'edit_request' must be"),
    ("CritiqueRevisionFewShotPrompts.json", ["\n\nHuman: a\n\nAssistant: b\n\nCritiqueRequest: c\n\nCritique: d"],
     r"CritiqueRevisionFewShotPrompts\.json: index 0: expected 'Human:'"),
    ("CritiqueRevisionFewShotPrompts.json", ["no labels at all"], r"FewShotPrompts\.json: index 0: expected a transcript"),
    ("RLMadisonInstructions.json", ["Good one\nOptions:", "Which is better?"], r"RLMadisonInstructions\.json: index 1: "
     r"expected a string ending in 'Options:'"),
    ("RLMadisonFewShotPrompts.json", [{"prompt": "p", "corrects": [" (A)"]}],
     r"RLMadisonFewShotPrompts\.json: index 0\.incorrects: expected a non-empty list"),
    ("RLMadisonPrecogFewShotPrompts.json", [{"prompt": "no verdict"}], r"Precog.*index 0: expected"),
    ("RLMadisonInstructions.json", "{not json", r"RLMadisonInstructions\.json: invalid JSON at line 1"),
])
def test_malformed_paper_file_names_file_and_index(tmp_path, name, content, message):
    folder = paper_folder(tmp_path)
    (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConstitutionError, match=message):
        Constitution.load(folder)


def test_paper_folder_missing_file(tmp_path):
    folder = paper_folder(tmp_path)
    (folder / "RLMadisonInstructions.json").unlink()
    with pytest.raises(ConstitutionError, match=r"RLMadisonInstructions\.json: missing"):
        Constitution.load(folder)
