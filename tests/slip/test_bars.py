"""Progress bars show on a terminal and nowhere else (``slip.bars.progress_bar``, tqdm's own terminal check)."""

from __future__ import annotations

import io

from slip.bars import progress_bar


class Terminal(io.StringIO):
    """A text stream that is a terminal, as far as tqdm asks (``isatty``)."""

    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_on_a_terminal_only():
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        for _ in progress_bar(range(3), desc="steps", file=stream):
            pass
        assert ("steps" in stream.getvalue()) == drawn, stream.getvalue()


def test_a_bar_turned_off_stays_off_on_a_terminal():
    stream = Terminal()
    with progress_bar(total=3, desc="steps", file=stream, enabled=False) as bar:
        bar.update(3)
    assert stream.getvalue() == ""
