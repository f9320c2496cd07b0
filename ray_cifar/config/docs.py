"""Field docs for --help-config, read from the schema's source: the comment after each field."""

from __future__ import annotations

import inspect

from .schema import METADATA, SECTIONS, Config


def _comments(cls: type) -> dict[str, str]:
    """Each field of a dataclass: the comment after it, or the comment lines just above it."""
    docs, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        line = line.strip()
        if line.startswith("#"):
            above.append(line.lstrip("# "))
            continue
        if ":" in line and not line.startswith(("class", '"', "def", "@")):
            name = line.split(":", 1)[0].strip()
            if name.isidentifier():
                docs[name] = line.split("#", 1)[1].strip() if "#" in line else " ".join(above)
        above = []
    return docs


def field_docs() -> dict[str, str]:
    """'section.field' (and each top-level metadata field) -> its doc."""
    docs = {}
    for section in SECTIONS:
        docs.update({f"{section}.{name}": doc for name, doc in _comments(type(getattr(Config(), section))).items()})
    docs.update({name: doc for name, doc in _comments(Config).items() if name in METADATA})
    return docs


def describe() -> str:
    defaults = Config().to_dict()
    lines = []
    for key, doc in field_docs().items():
        section, _, name = key.partition(".")
        default = defaults[section][name] if name else defaults[section]
        lines.append(f"  {key} = {default!r}\n      {doc}")
    return "\n".join(lines)
