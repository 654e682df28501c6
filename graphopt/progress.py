"""Progress of a compile on stderr: one tqdm bar over its phases (capture, each pass, build, check), its text the
step running now — a measurement of the cost model, a plan tried. Shown when asked (`progress=True`) or when
stderr is a terminal (`progress=None`), never otherwise: a compile in a script, a notebook's captured output or a
test writes nothing."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, enabled: bool | None = False, phases: int = 0):
        self.bar = None
        if enabled if enabled is not None else sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=phases, desc="graphopt", unit=" phase", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc}: {n_fmt}/{total_fmt} |{bar:12}| {elapsed}{postfix}")

    def phase(self, name: str) -> None:
        """A new phase begins (the previous one is done)."""
        if self.bar is not None:
            started = self.bar.desc != "graphopt"
            self.bar.set_description_str(f"graphopt {name}", refresh=False)
            self.bar.set_postfix_str("", refresh=not started)
            if started:
                self.bar.update(1)

    def step(self, text: str) -> None:
        """What the phase is doing now."""
        if self.bar is not None:
            self.bar.set_postfix_str(text[:80])

    def each(self, items, what: str):
        """Yield `items`, saying "what i/n" before each: a pass's sub-steps (layers measured, blocks checked)."""
        items = list(items)
        for i, item in enumerate(items, 1):
            self.step(f"{what} {i}/{len(items)}")
            yield item

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.set_description_str("graphopt done", refresh=False)
            self.bar.set_postfix_str("")
            self.bar.close()
            self.bar = None
