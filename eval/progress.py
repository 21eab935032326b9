"""Progress bars for evals: tqdm on a terminal, a plain line every few seconds otherwise."""
import sys

from tqdm import tqdm


def progress(total, desc, unit="tok"):
    """A tqdm bar with rate and ETA; when stderr is not a terminal, plain lines at most every 10 s."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, mininterval=10.0, ncols=100)
