"""Llama Guard 3 hazard categories, as the model's prompt names them and as the UI shows them."""

from __future__ import annotations

# The 1B model's categories, worded exactly as its chat template writes them.
LLAMA_GUARD_3_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
}
# Llama Guard 3 8B adds one category for tool-using agents.
LLAMA_GUARD_3_8B_CATEGORIES: dict[str, str] = {**LLAMA_GUARD_3_CATEGORIES, "S14": "Code Interpreter Abuse."}

# Longer names for people (the MLCommons hazard taxonomy names).
DISPLAY_NAMES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons (CBRNE)",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}


def display_name(code: str, categories: dict[str, str] | None = None) -> str:
    """A category's name for people: the taxonomy name, or a custom category's own text."""
    if code in DISPLAY_NAMES and (categories is None or categories.get(code) == LLAMA_GUARD_3_8B_CATEGORIES.get(code)):
        return DISPLAY_NAMES[code]
    if categories and code in categories:
        return categories[code].rstrip(".")
    return code


def parse_codes(text: str) -> tuple[str, ...]:
    """'S6, s7' -> ('S6', 'S7'); raises ValueError on anything that is not a category code."""
    codes = []
    for part in text.split(","):
        code = part.strip().upper()
        if not code:
            continue
        if not (code.startswith("S") and code[1:].isdigit()):
            raise ValueError(f"{part.strip()!r} is not a category code (S1, S2, ...)")
        codes.append(code)
    return tuple(codes)
