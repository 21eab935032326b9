"""Progress bars for evals: tqdm on a terminal, a plain line every 10 s otherwise (a log file)."""
import sys

from tqdm import tqdm


class _Lines:
    """Where tqdm redraws its bar with a carriage return, a log gets one line per redraw."""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:  # tqdm also writes blanks to clear the bar and a newline on close
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress(total, desc, unit="tok"):
    """A tqdm bar with rate and ETA; when stderr is not a terminal, plain lines at most every 10 s."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, mininterval=10.0, ncols=100, file=_Lines())
