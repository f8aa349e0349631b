"""The demo's tables: one storm, or the plain storm and the idempotent one side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TITLES = {"plain": "plain celery.Task", "idempotent": "celery_idem.IdempotentTask"}

LEGEND = """\
orders      orders of the scenario (for "long run": one settlement batch)
sent        messages the producer published: checkouts (charge_order | send_receipt), settlements
kills       processes SIGKILLed: pool processes killed in a charge_order body, "+1w" a whole
            worker (main process and pool)
executed    task bodies that started, including runs cut off by the kills
cached      deliveries answered with the recorded result, the body not run
taken-over  leases of cut-off runs taken over by a later delivery, under a higher fencing token
rows        charges and receipts (settlements for "long run") in the ledger
duplicates  rows beyond one per order (must be 0 for the idempotent run)
lost        orders without their charge or receipt (must be 0)"""

Column = tuple[str, list[str]]


def single_table(result: dict[str, Any]) -> str:
    """The table of one storm."""
    rows = _rows(result)
    columns = [_scenario_column(rows), *_shared_columns(rows), *_run_columns(rows, result["task_base"])]
    return _render([("", columns)])


def compare_table(plain: dict[str, Any], idempotent: dict[str, Any]) -> str:
    """Both storms side by side: the same messages, sent to plain tasks and to idempotent ones."""
    plain_rows, idem_rows = _rows(plain), _rows(idempotent)
    return _render(
        [
            ("", [_scenario_column(idem_rows), *_shared_columns(idem_rows)]),
            (TITLES["plain"], _run_columns(plain_rows, "plain")),
            (TITLES["idempotent"], _run_columns(idem_rows, "idempotent")),
        ]
    )


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [*result["scenarios"], result["total"]]


def _scenario_column(rows: Sequence[dict[str, Any]]) -> Column:
    return ("scenario", [row["scenario"] for row in rows])


def _shared_columns(rows: Sequence[dict[str, Any]]) -> list[Column]:
    return [("orders", [str(row["orders"]) for row in rows]), ("sent", [str(row["sent"]) for row in rows])]


def _run_columns(rows: Sequence[dict[str, Any]], task_base: str) -> list[Column]:
    fields = ["kills", "executed", "cached", "taken-over", "rows", "duplicates", "lost", "seconds"]
    if task_base == "plain":
        # Plain tasks keep no results to serve and hold no leases.
        fields.remove("cached")
        fields.remove("taken-over")
    keys = {"cached": "replayed", "taken-over": "taken_over"}
    columns = []
    for field in fields:
        cells = []
        for row in rows:
            if field == "kills":
                cell = str(row["killed_processes"])
                if row["killed_workers"]:
                    cell += f"+{row['killed_workers']}w"
            else:
                cell = str(row[keys.get(field, field)])
            if field == "seconds" and not row["complete"]:
                cell += "*"
            cells.append(cell)
        columns.append((field, cells))
    return columns


def _render(groups: Sequence[tuple[str, Sequence[Column]]]) -> str:
    gap = "  "
    blocks = []
    for title, columns in groups:
        widths = [max(len(header), *(len(cell) for cell in cells)) for header, cells in columns]
        blocks.append((title, columns, widths))
    lines = []
    if any(title for title, _, _ in blocks):
        parts = []
        for title, _, widths in blocks:
            span = sum(widths) + len(gap) * (len(widths) - 1)
            parts.append(title.center(span) if title else " " * span)
        lines.append(" | ".join(parts).rstrip())
    height = len(blocks[0][1][0][1])
    for index in range(-1, height):
        parts = []
        for _, columns, widths in blocks:
            cells = []
            for position, ((header, values), width) in enumerate(zip(columns, widths)):
                text = header if index < 0 else values[index]
                left = position == 0 and header == "scenario"
                cells.append(text.ljust(width) if left else text.rjust(width))
            parts.append(gap.join(cells))
        lines.append(" | ".join(parts))
        if index < 0 or index == height - 2:
            lines.append("-+-".join("-" * len(part) for part in parts))
    return "\n".join(lines)
