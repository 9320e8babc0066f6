"""Render for other programs: every program of the population, ranked, as JSON or CSV."""

import csv
import io
import json
from pathlib import Path

from ..util import atomic_write
from .analyse import RANKING_RULE, pairs_by_seed
from .load import RunView
from .text import export_extra, export_row, paired_fields


def rows(view: RunView) -> list[dict]:
    extra, by_seed = export_extra(view.population), pairs_by_seed(view)
    return [export_row(p, extra) | (paired_fields(view, p) if by_seed else {}) for p in view.population]


def export_json(view: RunView, path: Path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path,
        json.dumps(
            dict(
                run=str(view.run_dir),
                checkpoint=view.checkpoint.name,
                iteration=view.iteration,
                ranking=RANKING_RULE,
                programs=rows(view),
            ),
            indent=2,
        ),
    )


def export_csv(view: RunView, path: Path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table = rows(view)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    atomic_write(path, text.getvalue())
