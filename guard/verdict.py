"""Guard verdicts and their strict parsing: anything unexpected blocks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from guard.categories import display_name

UNREADABLE = "unreadable verdict"


@dataclass(frozen=True)
class Verdict:
    safe: bool
    categories: tuple[str, ...] = ()
    category_names: tuple[str, ...] = ()
    score: float = 0.0  # P(unsafe) from the verdict token
    stage: str = ""  # input or output
    latency_s: float = 0.0
    guard_model: str = ""
    reason: str = ""  # why a verdict blocked without categories (unreadable, error)
    precision: str = ""  # how the guard computed: int8, bf16, fp32 (guard.precision)
    engine: str = ""  # where: local, or the address of the server that computed it (guard.remote)
    raw: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["categories"], d["category_names"] = list(self.categories), list(self.category_names)
        return d

    def describe(self) -> str:
        if self.safe:
            return "passed"
        return "blocked: " + (", ".join(self.category_names) or self.reason or "unsafe")


def parse_verdict(text: str, allowed, excluded=(), categories: dict[str, str] | None = None) -> Verdict:
    """Read the guard's answer. 'safe' is safe; 'unsafe' with a line of known codes is unsafe; a verdict
    whose codes are all excluded is safe; everything else is unsafe with an 'unreadable verdict' reason."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    known = set(allowed) | set(excluded)
    if lines == ["safe"]:
        return Verdict(True, raw=text)
    if len(lines) == 2 and lines[0] == "unsafe":
        codes = [c.strip() for c in lines[1].split(",")]
        if codes and all(c in known for c in codes):
            codes = list(dict.fromkeys(codes))
            active = tuple(c for c in codes if c not in set(excluded))
            if not active:
                return Verdict(True, raw=text)
            return Verdict(False, active, tuple(display_name(c, categories) for c in active), raw=text)
    return Verdict(False, reason=UNREADABLE, raw=text)
