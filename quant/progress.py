"""Progress of long work (eval, calibration): a tqdm bar on a terminal, one line per step otherwise.

A bar's carriage returns turn a log file or CI output into one unreadable line, so off a terminal each
finished step is one plain line on stderr: `what: 3/30 layers, 12.4 s`.
"""

import sys
import time


def progress(items, what: str, unit: str = "step", total: int | None = None, note=None):
    """Iterate `items`, reporting each finished step; note(item) may add a few words to the step's line."""
    total = total if total is not None else len(items) if hasattr(items, "__len__") else None
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(items, desc=what, unit=unit, total=total) as bar:
            for item in bar:
                yield item
                if note is not None:
                    bar.set_postfix_str(note(item))
        return
    start = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        extra = f" ({note(item)})" if note is not None else ""
        print(f"{what}: {done}/{total or '?'} {unit}s, {time.monotonic() - start:.1f} s{extra}", file=sys.stderr, flush=True)
