"""Rewriting column references for a shadow column: tokens, not regexes, so literals and other names stay."""

from __future__ import annotations

import pytest

from tasks.online_plan import rename_identifier

CASES = [
    ("amount > 0", '"_fy_new_amount" > 0'),
    ("AMOUNT > 0", '"_fy_new_amount" > 0'),  # unquoted names fold to lower case
    ('"amount" > 0', '"_fy_new_amount" > 0'),
    ('"Amount" > 0', '"Amount" > 0'),  # a different column
    ("note <> 'amount'", "note <> 'amount'"),
    ("note <> E'it\\'s amount' AND amount > 1", "note <> E'it\\'s amount' AND \"_fy_new_amount\" > 1"),
    ("$$amount$$ <> note", "$$amount$$ <> note"),
    ("/* amount */ amount", '/* amount */ "_fy_new_amount"'),
    ("other.amount + amount", 'other.amount + "_fy_new_amount"'),
    ("amount(amount)", 'amount("_fy_new_amount")'),  # a function of that name
    (
        "CAST(x AS amount) = amount::amount",
        'CAST(x AS amount) = "_fy_new_amount"::amount',
    ),  # a type of that name
]


@pytest.mark.parametrize(("expression", "expected"), CASES)
def test_rename_identifier_rewrites_only_references_to_the_column(expression: str, expected: str) -> None:
    assert rename_identifier(expression, "amount", "_fy_new_amount") == expected
