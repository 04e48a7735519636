from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Result:
    """What a command produced: ``data`` for ``--json``, ``text`` for people.

    ``ok`` is False when the command ran but found problems the caller should act on (a lint
    that failed); the exit code is then 1. Partial success (some files imported, some rejected
    and listed) is ok. ``exit_code`` overrides that (130: stopped by Ctrl-C, as shells report it).
    """

    data: dict = field(default_factory=dict)
    text: str = ""
    ok: bool = True
    exit_code: int | None = None
    printed: bool = False  # the output was printed already (by the processes a launcher started)

    @property
    def code(self) -> int:
        if self.exit_code is not None:
            return self.exit_code
        return 0 if self.ok else 1
