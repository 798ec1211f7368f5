"""Terminal output shared by the commands: progress on stderr, tables and JSON on stdout."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

err = Console(stderr=True, soft_wrap=True)  # paths in messages must not be wrapped
out = Console()

# Third-party chatter the CLI silences, so that each long step shows our own progress only:
# transformers' bars ("Loading weights" at every model load) and advisory warnings, and
# hivemind's INFO logs. As environment defaults they reach a library imported later (no
# import at start-up) and the demo's training workers, which inherit them; a variable the
# user set is kept (HIVEMIND_LOGLEVEL=DEBUG shows the DHT at work).
QUIET_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "HIVEMIND_LOGLEVEL": "ERROR"}


def quiet_third_party() -> None:
    """Silence transformers' progress bars and logs and hivemind's logs (see QUIET_ENVIRONMENT)."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # Those read the environment when imported; one imported already is told directly.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging  # only when already imported (heavy)

        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            hf_logging.disable_progress_bar()
        hf_logging.set_verbosity(hf_logging.log_levels.get(os.environ["TRANSFORMERS_VERBOSITY"], hf_logging.ERROR))
    if "hivemind" in sys.modules:
        from hivemind.utils.logging import get_logger  # only when already imported (heavy)

        get_logger("hivemind").setLevel(os.environ["HIVEMIND_LOGLEVEL"].upper())


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A listing's human form on stdout (its ``--json`` form prints the rows themselves)."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)


@contextmanager
def tensor_progress(verb: str) -> Iterator[Callable[[int, int, str], None]]:
    """A transient progress bar fed by ``callback(done, total, item_name)``."""
    with Progress(
        TextColumn(f"[bold]{verb}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=err, transient=True,
        # Off when stderr is not a terminal: rich would still write a stray empty line
        # there, and the error contract is exactly one `error:` line.
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("", total=None)

        def callback(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        yield callback
