"""Each request field is declared once (service/tasks/fields.py): the validation and both
generated documents (/docs.json, /schema.json) come from that declaration, so they agree on
every type, range, default and description."""

from __future__ import annotations

import pytest

from service import openapi
from service.errors import ApiError
from service.settings import Settings
from service.tasks import TASKS, routes
from service.tasks.fields import Boolean, Choice, Integer, Text, Texts, limit

SETTINGS = Settings(max_generate=5, max_images=7, max_texts=3, max_text_chars=50)
DECLARED = [(task, f) for task in TASKS.values() for f in task.request.declared]


def ids(pair) -> str:
    task, f = pair
    return f"{task.name}.{f.name}"


def document_properties(task, kind: str = "") -> dict:
    content = openapi.document(SETTINGS)["paths"][task.route]["post"]["requestBody"]["content"]
    media = "multipart/form-data" if task.body == "multipart" else "application/json"
    return content[media]["schema"]["properties"]


@pytest.mark.parametrize("pair", DECLARED, ids=ids)
def test_the_openapi_document_shows_each_field_as_declared(pair):
    task, f = pair
    assert document_properties(task)[f.name] == f.schema(SETTINGS)


@pytest.mark.parametrize("pair", [p for p in DECLARED if p[1].default is not None], ids=ids)
def test_an_absent_field_reads_as_the_default_the_documents_advertise(pair):
    task, f = pair
    advertised = f.schema(SETTINGS).get("default")
    assert f.read(None, SETTINGS) == advertised
    # BentoML's client has one method per route: /classify's shared fields show the image task's
    first = next(t for t in routes()[task.route].values() if f.name in t.request.by_name)
    client = {r["route"]: r for r in openapi.bentoml_schema(SETTINGS)["routes"]}[task.route]["input"]["properties"]
    if f.name == "format":  # BentoML's client gets what the schema says: the PNG
        assert f.name not in client
    else:
        assert client[f.name].get("default") == first.request[f.name].schema(SETTINGS).get("default")


def test_required_fields_and_the_unknown_field_check_come_from_the_declarations():
    required = {
        "image-classification": ["image"],
        "text-classification": [],  # one of text / texts: a oneOf in the document
        "conditional-image-generation": [],
        "image-compression-encoder": ["image"],
        "image-compression-decoder": ["code"],
        "image-denoising": ["image"],
    }
    for task in TASKS.values():
        props, needed = task.properties(SETTINGS, [])
        assert needed == required[task.name]
        assert task.fields == {n for n in props if n != "image"}  # files are not form or JSON fields


def test_the_documented_defaults_are_the_served_ones():
    """The values written twice before the declarations: top_k 3 (images) and 2 (text), n 16, steps 9."""
    assert TASKS["image-classification"].request["top_k"].read(None, SETTINGS) == 3
    assert TASKS["text-classification"].request["top_k"].read(None, SETTINGS) == 2
    gen = TASKS["conditional-image-generation"].request
    assert (gen["n"].read(None, SETTINGS), gen["steps"].read(None, SETTINGS), gen["format"].read(None, SETTINGS)) == (
        16,
        9,
        "png",
    )


INTEGERS = [(t, f) for t, f in DECLARED if isinstance(f, Integer)]


@pytest.mark.parametrize("pair", INTEGERS, ids=ids)
def test_integer_ranges_are_enforced_exactly_at_the_documented_bounds(pair):
    task, f = pair
    schema = f.schema(SETTINGS)
    lo, hi = schema["minimum"], schema["maximum"]
    assert f.read(lo, SETTINGS) == lo and f.read(str(hi), SETTINGS) == hi  # form fields arrive as strings
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ApiError) as err:
            f.read(bad, SETTINGS)
        assert err.value.status == 400 and err.value.reason == "out_of_range"
        assert err.value.message.startswith(f"{f.name} must be between {lo} and {hi}")
    with pytest.raises(ApiError, match=f"{f.name} must be an integer"):
        f.read(True, SETTINGS)


def test_limits_named_by_a_setting_follow_the_settings():
    n = TASKS["conditional-image-generation"].request["n"]
    assert n.maximum == "max_generate" and limit(n.maximum, SETTINGS) == 5
    assert n.schema(Settings(max_generate=64))["maximum"] == 64
    images = TASKS["image-classification"].request["image"].schema(SETTINGS)
    assert images["maxItems"] == 7


def test_text_fields_refuse_as_declared():
    text = TASKS["text-classification"].request["text"]
    texts = TASKS["text-classification"].request["texts"]
    assert isinstance(text, Text) and isinstance(texts, Texts)
    assert text.schema(SETTINGS)["maxLength"] == 50 and texts.schema(SETTINGS)["maxItems"] == 3
    with pytest.raises(ApiError) as err:
        text.read("x" * 51, SETTINGS)
    assert (err.value.status, err.value.reason, err.value.extra) == (413, "text_too_long", {"limit": 50})
    with pytest.raises(ApiError, match="text is empty or only whitespace"):
        text.read(" \n", SETTINGS)
    with pytest.raises(ApiError, match=r"texts\[1\] is empty"):
        texts.read(["fine", "  "], SETTINGS)
    with pytest.raises(ApiError, match="texts must be a list of 1 to 3 strings"):
        texts.read(["a"] * 4, SETTINGS)


def test_booleans_and_choices_read_json_and_form_values():
    reject = TASKS["image-classification"].request["reject_ood"]
    assert isinstance(reject, Boolean)
    assert [reject.read(v, SETTINGS) for v in (True, "true", "1", "false", "0", None)] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    fmt = TASKS["conditional-image-generation"].request["format"]
    assert isinstance(fmt, Choice) and fmt.read("json", SETTINGS) == "json"
    with pytest.raises(ApiError, match="format must be 'png' or 'json', got 'gif'"):
        fmt.read("gif", SETTINGS)


def test_morph_to_reads_its_parts_under_its_own_name():
    morph = TASKS["conditional-image-generation"].request["morph_to"]
    assert morph.read({"digit": 8}, SETTINGS) == {"digit": 8}
    with pytest.raises(ApiError, match=r"morph_to\.seed must be between 0 and"):
        morph.read({"seed": -1}, SETTINGS)
    with pytest.raises(ApiError, match="morph_to must be an object like"):
        morph.read({"digit": 1, "colour": "red"}, SETTINGS)


def test_every_field_is_described_and_every_route_documents_its_tasks():
    for task, f in DECLARED:
        assert f.description, f"{task.name}.{f.name} has no description"
    assert {path for path in routes()} <= set(openapi.document(SETTINGS)["paths"])
