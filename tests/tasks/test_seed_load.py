"""The order seed mode loads its tables in, from their foreign keys (no database needed)."""

from __future__ import annotations

from tasks.seed_load import ForeignKeyEdge, seed_order


def _edge(child: str, parent: str, deferrable: bool = False) -> ForeignKeyEdge:
    return ForeignKeyEdge(("public", child), ("public", parent), f"{child}_{parent}_fkey", deferrable)


def _tables(*names: str) -> list[tuple[str, str]]:
    return [("public", n) for n in names]


def test_parents_load_first_and_the_run_order_holds_among_tables_ready_together():
    edges = [_edge("accounts", "plans"), _edge("plans", "tiers"), _edge("invoices", "accounts")]
    order = seed_order(_tables("accounts", "countries", "invoices", "plans", "tiers"), edges)
    assert order.tables == _tables("countries", "tiers", "plans", "accounts", "invoices")
    assert not order.defer and order.cycles == {}


def test_a_cycle_that_is_not_deferrable_is_broken_at_its_first_table_and_named():
    edges = [_edge("child", "x"), _edge("x", "y"), _edge("y", "x")]
    order = seed_order(_tables("child", "x", "y"), edges)
    assert order.tables == _tables("x", "child", "y")  # not the child of the cycle first: it needs x only
    assert not order.defer
    assert order.cycles == {
        (("public", "x"), "x_y_fkey"): _tables("x", "y", "x"),
        (("public", "y"), "y_x_fkey"): _tables("y", "x", "y"),
    }


def test_a_cycle_with_a_deferrable_key_is_deferred_and_ordered_by_the_other_keys():
    edges = [_edge("a", "b", deferrable=True), _edge("b", "c"), _edge("c", "a")]
    order = seed_order(_tables("a", "b", "c"), edges)
    assert order.defer and order.cycles == {}
    assert order.tables == _tables("a", "c", "b")
