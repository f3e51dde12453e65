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


def test_library_bars_follow_the_terminal():
    from slip.bars import HF_BARS_OFF, library_bars_follow

    for stream, environ, after in ((io.StringIO(), {}, "1"), (Terminal(), {}, None),
                                   (io.StringIO(), {HF_BARS_OFF: "0"}, "0")):  # the user's own choice stays
        library_bars_follow(stream, environ)
        assert environ.get(HF_BARS_OFF) == after, (stream, environ)


def test_loading_models_in_a_log_draws_no_bar(tmp_path):
    """The real entry point with stderr a pipe: transformers' "Loading weights" bar (one per model it loads, the
    bundled synth ranker's here) stays out of the log; the answer is printed as ever."""
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "x.png")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run([sys.executable, "-m", "producer", "segment", str(tmp_path / "x.png"), "-p", "circle",
                           "--sam", "synth", "--clip", "synth", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env={**env, "SLIP_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "x.png:" in done.stdout and "ranker synth" in done.stderr, (done.stdout, done.stderr)
    assert "Loading weights" not in done.stderr and "\r" not in done.stderr, done.stderr
