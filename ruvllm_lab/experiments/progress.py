"""One progress bar for the experiments' long loops (tqdm.auto: a widget in Jupyter, text elsewhere)."""
from __future__ import annotations

from typing import Callable


def step_progress(total: int, show: bool, desc: str, unit: str = "run") -> Callable[[str], None]:
    """``step(postfix)`` advances the bar by one and shows ``postfix``; the bar closes at ``total``."""
    if not show:
        return lambda postfix="": None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit)

    def step(postfix: str = "") -> None:
        if postfix:
            bar.set_postfix_str(postfix)
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return step
