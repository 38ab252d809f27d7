"""YAML reading for configs: syntax errors become one line naming the file, line and problem."""
from __future__ import annotations

import yaml


def parse_yaml(text: str, source: str):
    """``yaml.safe_load(text)``; a syntax error is a ValueError naming ``source``, line and problem."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{source}: invalid YAML{where}: {problem}") from None
