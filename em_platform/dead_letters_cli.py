"""``em-platform dead-letters``: list, replay or clear what the entry points refused.

Listing is the default (waiting letters, oldest first; ``--all`` adds cleared ones, ``--json`` prints whole
rows with the raw body and headers). ``--replay`` sends a broker letter through the journal again, with the
current settings (e.g. after adding a share to ``EM_SCOPE_SHARES``): it passes the same edge checks, and a
letter that still fails stays waiting with the reason printed. ``--clear`` records the operator's decision;
cleared letters stay listed with ``--all``. A letter whose body was too large to keep whole (see
:data:`em_platform.catalog.dead_letters.KEPT_BODY_BYTES`) says so, with the whole body's length and SHA-256,
and cannot be replayed: the sender has to send it again.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from em_platform.catalog.dead_letters import DeadLetter, DeadLetters

__all__ = ["add_arguments", "run"]


def _ids(values: list[str], option: str) -> list[int] | None:
    """``all`` -> None (every waiting letter), else the ids; ValueError names the option."""
    if values == ["all"]:
        return None
    try:
        return [int(v.lstrip("#")) for v in values]
    except ValueError:
        raise ValueError(f"{option} takes letter ids (e.g. 3 7) or 'all', not {' '.join(values)!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--replay",
        nargs="+",
        metavar="ID",
        help="journal broker letters again through today's checks (ids, or 'all'); replayed ones are cleared",
    )
    what.add_argument(
        "--clear", nargs="+", metavar="ID", help="mark letters decided (ids, or 'all'); they stay in --all"
    )
    parser.add_argument("--all", action="store_true", help="list cleared letters too")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per letter, body and headers included"
    )


def run(args: argparse.Namespace, catalog_url: str, tile_shares: tuple[str, ...]) -> int:
    """0 when done (or nothing waits), 1 when a replay was refused again, 2 on a usage error."""
    try:
        replay = _ids(args.replay, "--replay") if args.replay else None
        clear = _ids(args.clear, "--clear") if args.clear else None
    except ValueError as exc:
        print(f"em-platform dead-letters: {exc}", file=sys.stderr)
        return 2
    # imported here, not on top: SQLAlchemy is 0.4 s, which every `em-platform` command paid
    from em_platform.catalog.dead_letters import DeadLetters

    letters = DeadLetters(catalog_url)
    try:
        if args.clear:
            n = letters.clear(clear, resolution="cleared")
            print(f"{n} dead letter(s) cleared")
            return 0
        if args.replay:
            return _replay(letters, replay, catalog_url, tile_shares)
        shown = letters.letters(include_cleared=args.all)
        for letter in shown:
            print(json.dumps(letter.as_dict(), sort_keys=True) if args.json else letter.line())
        if not args.json:
            waiting = sum(1 for x in shown if x.cleared_at is None)
            print(
                f"{waiting} waiting"
                + (f", {len(shown) - waiting} cleared" if args.all else "")
                + (
                    "; replay with --replay ID|all (broker letters), clear with --clear ID|all"
                    if waiting
                    else ""
                )
            )
        return 0
    finally:
        letters.dispose()


def _replay(
    letters: DeadLetters, ids: list[int] | None, catalog_url: str, tile_shares: tuple[str, ...]
) -> int:
    from em_platform.edge import Refused
    from em_platform.tem.journal import Journal
    from em_platform.tem.protocol import CONSUMED, ProtocolError, decode

    chosen: list[DeadLetter] = [x for x in letters.letters() if ids is None or x.id in ids]
    missing = sorted(set(ids or ()) - {x.id for x in chosen})
    for i in missing:
        print(f"#{i}: no such waiting dead letter", file=sys.stderr)
    journal = Journal(catalog_url, tile_shares=tile_shares)
    refused = 0
    try:
        for letter in chosen:
            if letter.source != "broker" or letter.topic not in CONSUMED:
                print(
                    f"#{letter.id} ({letter.source} {letter.topic}): nothing to replay; fix it at its source "
                    "(an inbox entry is picked up again when it changes), then --clear it"
                )
                continue
            if letter.body_truncated:
                refused += 1
                print(
                    f"#{letter.id} {letter.topic}: cannot replay, only part of it was kept "
                    f"({letter.kept().describe()}); have the scope send it again, then --clear it"
                )
                continue
            try:
                new = journal.record(letter.topic, decode(letter.topic, letter.body))
            except (Refused, ProtocolError) as exc:
                refused += 1
                print(f"#{letter.id} {letter.topic}: still refused: {exc}")
                continue
            letters.clear([letter.id], resolution="replayed")
            print(f"#{letter.id} {letter.topic}: " + ("journaled" if new else "was already in the journal"))
    finally:
        journal.dispose()
    return 1 if refused or missing else 0
