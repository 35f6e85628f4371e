"""Description banks and HeBA's per-class prompt bank."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from vladapt.errors import ConfigError
from vladapt.methods.prompts import PromptBank, load_description_bank

GERENUK = ["A gerenuk is a type of antelope with a long neck.", "It stands on its hind legs to feed."]
BANK = {
    "gerenuk": GERENUK,
    "sea lion": ["A sea lion is a marine mammal."],
    "Crane": ["A crane is a tall wading bird.", "It has long legs.", "Its neck is long."],
}


def test_prompts_are_the_reference_concatenation():
    bank = PromptBank.build(["gerenuk"], BANK)
    assert bank.prompts == [[
        "a photo of a gerenuk, A gerenuk is a type of antelope with a long neck.",
        "a photo of a gerenuk, It stands on its hind legs to feed.",
    ]]
    assert bank.counts == [2] and bank.num_templates == 2 and bank.missing == []
    custom = PromptBank.build(["gerenuk"], BANK, prefix="an image of the")
    assert custom.prompts[0][1] == "an image of the gerenuk, It stands on its hind legs to feed."


def test_underscores_and_case_insensitive_lookup():
    bank = PromptBank.build(["sea_lion", "CRANE", "Gerenuk"], BANK)
    assert bank.prompts[0][0] == "a photo of a sea lion, A sea lion is a marine mammal."
    assert bank.prompts[1][2] == "a photo of a CRANE, Its neck is long."
    assert bank.prompts[2][0] == "a photo of a Gerenuk, A gerenuk is a type of antelope with a long neck."
    assert bank.missing == []


def test_original_name_key_and_exact_match_first():
    bank = PromptBank.build(["sea_lion", "crane"], {
        "sea_lion": ["under the original name."],
        "crane": ["a construction crane."],
        "Crane": ["a bird."],
    })
    assert bank.prompts[0] == ["a photo of a sea lion, under the original name."]
    assert bank.prompts[1] == ["a photo of a crane, a construction crane."]


def test_keys_that_differ_only_in_case_are_ambiguous():
    with pytest.raises(ConfigError, match="differ only in case"):
        PromptBank.build(["CRANE"], {"crane": ["a machine."], "Crane": ["a bird."]})


def test_short_classes_are_padded_with_their_first_prompt():
    bank = PromptBank.build(["gerenuk", "sea lion", "crane"], BANK)
    assert bank.num_templates == 3 and bank.num_classes == 3
    assert bank.counts == [2, 1, 3]
    assert bank.prompts[0][2] == bank.prompts[0][0]
    assert bank.prompts[1] == ["a photo of a sea lion, A sea lion is a marine mammal."] * 3
    assert len(set(bank.prompts[2])) == 3


def test_missing_classes_are_reported():
    with pytest.raises(ConfigError, match=r"2 of 3 classes: \['okapi', 'dik_dik'\]; .*set "
                                          r"method\.strict_descriptions=false \(Python: strict=False\)"):
        PromptBank.build(["okapi", "gerenuk", "dik_dik"], BANK)
    bank = PromptBank.build(["okapi", "gerenuk", "dik_dik"], BANK, strict=False)
    assert bank.missing == ["okapi", "dik_dik"]
    assert bank.counts == [1, 2, 1]
    assert bank.prompts[0] == ["a photo of a okapi."] * 2
    assert bank.prompts[2] == ["a photo of a dik dik."] * 2


def test_an_empty_description_list_counts_as_missing():
    bank = PromptBank.build(["okapi", "gerenuk"], {"okapi": [], **BANK}, strict=False)
    assert bank.missing == ["okapi"] and bank.prompts[0] == ["a photo of a okapi."] * 2


def test_without_a_bank_every_class_gets_one_prompt():
    bank = PromptBank.build(["cat", "sea_lion"], None)
    assert bank.prompts == [["a photo of a cat."], ["a photo of a sea lion."]]
    assert bank.num_templates == 1 and bank.counts == [1, 1] and bank.missing == []


def test_reference_fallback_string():
    # The prompt every class gets in the released HeBA code when its description import fails (§1.13).
    bank = PromptBank.build(["cat", "sea_lion"], None, reference_fallback=True)
    assert bank.prompts == [["a photo of a cat, a photo of a cat."], ["a photo of a sea lion, a photo of a sea lion."]]
    lax = PromptBank.build(["okapi"], BANK, reference_fallback=True, strict=False)
    assert lax.prompts == [["a photo of a okapi, a photo of a okapi."]]


def test_no_classes_is_an_error():
    with pytest.raises(ConfigError, match="at least one class"):
        PromptBank.build([], BANK)


def test_sampling_draws_every_template_independently_per_class():
    descriptions = {f"class {k}": [f"description {t}" for t in range(20)] for k in range(3)}
    bank = PromptBank.build(list(descriptions) + ["crane"], {**descriptions, **BANK})
    assert bank.num_templates == 20
    g = torch.Generator().manual_seed(0)
    draws = [bank.sample(torch.tensor([0, 2, 3, 0]), g) for _ in range(400)]
    assert all(len(d) == 4 for d in draws)
    for column, k in ((0, 0), (1, 2), (3, 0)):
        assert Counter(d[column] for d in draws).keys() == set(bank.prompts[k])
        assert min(Counter(d[column] for d in draws).values()) >= 5
    # Independent draws: the two slots of class 0 agree only about 1/20 of the time.
    assert sum(d[0] == d[3] for d in draws) < 60
    # Crane has 3 descriptions padded to 20 by its first: drawn uniformly over the padded bank.
    crane = Counter(d[2] for d in draws)
    assert crane[bank.prompts[3][0]] > crane[bank.prompts[3][1]] + crane[bank.prompts[3][2]]


def test_sampling_is_seeded_and_checks_class_ids():
    bank = PromptBank.build(["gerenuk", "crane"], BANK)
    a = bank.sample([1, 0, 1], torch.Generator().manual_seed(5))
    b = bank.sample([1, 0, 1], torch.Generator().manual_seed(5))
    assert a == b
    assert a[0] in bank.prompts[1] and a[1] in bank.prompts[0]
    with pytest.raises(IndexError):
        bank.sample([2])


def test_all_for_template():
    bank = PromptBank.build(["gerenuk", "crane"], BANK)
    assert bank.all_for_template(1) == [bank.prompts[0][1], bank.prompts[1][1]]
    assert bank.all_for_template(2) == [bank.prompts[0][0], "a photo of a crane, Its neck is long."]
    with pytest.raises(IndexError):
        bank.all_for_template(3)


# ---------------------------------------------------------------- reading description banks


def test_load_description_bank(tmp_path):
    path = tmp_path / "gerenuk.json"
    path.write_text(json.dumps(BANK), encoding="utf-8")
    assert load_description_bank(path) == BANK
    assert load_description_bank(str(path)) == BANK


@pytest.mark.parametrize("text,match", [
    ('{"gerenuk": ["ok",]}', "not valid JSON.*line 1"),
    ('["a", "b"]', "must be a JSON object"),
    ('{"gerenuk": "A gerenuk is an antelope."}', "key 'gerenuk' must map to a list of strings"),
    ('{"gerenuk": ["ok", 3]}', "key 'gerenuk', entry 1 must be a string"),
])
def test_bad_description_banks_name_the_file_and_key(tmp_path, text, match):
    path = tmp_path / "broken_bank.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match) as err:
        load_description_bank(path)
    assert "broken_bank.json" in str(err.value)


def test_missing_description_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read description bank .*nowhere.json"):
        load_description_bank(tmp_path / "nowhere.json")
