"""The bulk-copy demo step: load the static reference files shipped under
``deployments/demo_assets/bulk`` into the demo database, in chunks, with a mapping."""

from __future__ import annotations

from typing import Any

from deployments.runtime import PROJECT_DIR

BULK_DEMO_ASSETS = PROJECT_DIR / "deployments" / "demo_assets" / "bulk"


def bulk_demo_parameters(demo_url: str) -> dict[str, Any]:
    return {
        "source_url": str(BULK_DEMO_ASSETS),
        "target_url": demo_url,
        "target_schema": "bulk_demo",
        "chunk_rows": 500,
        "restart": True,
        "mapping": {
            "countries": {"key": ["code"]},
            "currencies": {"key": ["code"]},
            "events": {
                "key": ["id"],
                "compute": {
                    "amount_cents": "round(amount * 100)",
                    "big_purchase": "kind == 'purchase' and amount > 250",
                },
                "types": {"amount_cents": "bigint"},
            },
        },
    }
