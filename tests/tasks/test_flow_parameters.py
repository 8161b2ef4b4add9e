"""The parameter check every flowyard flow runs before its body: Prefect's own validation, with its
refusal in one line, and ``""`` read as the default only where a flow says so."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.errors import UserError
from tasks.flow_parameters import CheckedParametersFlow, checked_flow, unstorable_parameters


@checked_flow(name="checked-sample", blank_is_default=("status",))
def _sample(
    count: int,
    status: str | None = None,
    url: str | None = None,
    tags: list[int] | None = None,
    seconds: float = 1.0,
    flag: bool = False,
    extra: dict[str, Any] | None = None,
) -> None:
    """Never run: only its parameters are validated."""


def test_a_blank_listed_parameter_is_its_default_and_an_unlisted_one_stays_blank() -> None:
    checked = _sample.validate_parameters({"count": "3", "status": "", "url": ""})
    assert checked == {"count": 3, "status": None, "url": "", "tags": None, "seconds": 1.0, "flag": False, "extra": None}


def test_true_or_false_for_a_number_is_refused_in_one_line_and_kept_where_a_boolean_is_meant() -> None:
    """pydantic's lax mode read ``task_id=true`` as task 1 and ``true`` for seconds as 1.0."""
    with pytest.raises(UserError) as refused:
        _sample.validate_parameters({"count": True, "tags": [2, False], "seconds": True})
    assert str(refused.value) == (
        "checked-sample: parameter count is true: true or false is not a number; give a value of type int; "
        "parameter tags.1 is false: true or false is not a number; give a value of type list[int] | None; "
        "parameter seconds is true: true or false is not a number; give a value of type float"
    )
    kept = _sample.validate_parameters({"count": 1, "flag": True, "extra": {"on": True, "list": [False]}})
    assert kept["flag"] is True and kept["extra"] == {"on": True, "list": [False]}


def test_values_of_the_wrong_type_are_one_line_naming_each_parameter_value_and_type() -> None:
    with pytest.raises(UserError) as refused:
        _sample.validate_parameters({"count": None, "tags": ["x" * 100]})
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        "checked-sample: parameter count is null: Input should be a valid integer; give a value of type int; "
        'parameter tags.0 is "xxxx'
    )
    assert message.endswith("...: Input should be a valid integer, unable to parse string as an integer; give a value of type list[int] | None")


def test_only_a_parameter_whose_default_is_none_can_read_blank_as_its_default() -> None:
    with pytest.raises(TypeError, match="'count' is not a parameter whose default is None"):
        checked_flow(name="bad", blank_is_default=("count",))(_sample.fn)
    with pytest.raises(TypeError, match="'missing' is not a parameter"):
        checked_flow(name="bad", blank_is_default=("missing",))(_sample.fn)


def test_text_postgresql_cannot_store_is_found_at_any_depth_and_named_in_one_line() -> None:
    """The check of :meth:`CheckedParametersFlow.__call__` and of the REST trigger: keys count, a
    key on the way is shown as JSON, a value nested past the recursion limit is still reached, and
    past three places the rest are counted."""
    deep: Any = "\x00"
    for _ in range(3000):
        deep = [deep]
    message = unstorable_parameters({"ok": ["fine", {"k": 1.5}], "extra": {"a\nb": {"c": "\udc80"}}, "tags": deep})
    assert "\n" not in message and "\x00" not in message
    assert message == (
        'parameter extra."a\\nb".c is "\\udc80": a surrogate (\\udc80, half of a character in UTF-16), which is'
        " not UTF-8 text; remove it; "
        f'parameter tags.{"0." * 26}...{".0" * 30} is "\\u0000": a NUL character (\\u0000), which PostgreSQL'
        " cannot store; remove it"
    )
    assert unstorable_parameters({"many": ["\x00"] * 5}).endswith("parameter many.2 is \"\\u0000\": a NUL character"
                                                          " (\\u0000), which PostgreSQL cannot store; remove it (and 2 more)")
    assert unstorable_parameters({"title": "ok \U0001f600", "n": [1, None, True], "d": {1: "x"}}) == ""
    with pytest.raises(UserError, match=r'^checked-sample: parameter status is "a\\u0000": a NUL'):
        _sample(1, status="a\x00")  # before Prefect: no server is needed to refuse it


def test_a_copy_with_new_options_keeps_the_checks() -> None:
    """Prefect's ``with_options`` builds a plain ``Flow``: the copy took any parameter again."""
    renamed = _sample.with_options(name="renamed-sample", retries=1)
    assert isinstance(renamed, CheckedParametersFlow) and renamed.retries == 1
    assert renamed.blank_is_default == frozenset({"status"})
    assert renamed.validate_parameters({"count": 1, "status": ""})["status"] is None
    with pytest.raises(UserError, match=r'^renamed-sample: parameter status is "a\\u0000": a NUL'):
        renamed(1, status="a\x00")  # before Prefect: no flow run is created


def test_nan_or_infinity_is_refused_naming_its_place_before_prefect_creates_the_run() -> None:
    """JSON has no NaN nor Infinity: Prefect recorded the run's parameters with null for them while
    the body went on with the number (a retry or rerun of the record then ran with null)."""
    assert unstorable_parameters({"seconds": float("nan"), "extra": {"loss": [1.5, float("-inf")]}}) == (
        "parameter seconds is NaN: not a finite number, which JSON cannot hold (the flow run would record null);"
        " give a finite number; "
        "parameter extra.loss.1 is -Infinity: not a finite number, which JSON cannot hold (the flow run would"
        " record null); give a finite number"
    )
    with pytest.raises(UserError, match=r"^checked-sample: parameter seconds is Infinity: not a finite number"):
        _sample(1, seconds=float("inf"))  # before Prefect: no server is needed to refuse it
    assert unstorable_parameters({"seconds": 1e308, "n": [0.0, -2.5]}) == ""
