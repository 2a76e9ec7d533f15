"""Prompts: the columns a template reads, a row rendered into its prompt, and the escapes typed on a
command line. A template is a Python format string over a row's columns; what it may not do (read no
column, paste a whole nested column as Python text) is refused here with the row it happened on.
"""

from __future__ import annotations

import re
import string

from zotune.config import ConfigError, coerce


def unescape(text: str) -> str:
    """`\n` and `\t` in `text` as a newline and a tab (`\\` for a backslash itself)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def command_line_escapes(values: dict) -> dict:
    """Task options typed on a command line, with `\n` in their prompt texts read as a newline (a shell
    passes a backslash and an n). Files are read as YAML is: a newline there is written "\n" or as one."""
    out = dict(values)
    for key in ("template", "stop"):
        if isinstance(out.get(key), str) and out[key][:1] not in ("'", '"'):  # a quoted YAML scalar has its own escapes
            out[key] = unescape(out[key])
    if "verbalizer" in out:
        verbalizer = coerce(out["verbalizer"], dict[str, str], "task.verbalizer")
        out["verbalizer"] = {k: unescape(v) for k, v in verbalizer.items()}
    if "choices" in out:
        out["choices"] = [unescape(c) for c in coerce(out["choices"], list[str], "task.choices")]
    return out


def template_fields(template: str, option: str, allow_constant: bool = False) -> list[str]:
    """The columns a template reads ({a[b]} and {a[0]} read column a), or a ConfigError saying why it is bad."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{option}={template!r} is not a valid template ({e}); write literal braces as "
                          f"{{{{ }}}}") from None
    roots = [f.split(".")[0].split("[")[0] for f in fields]
    if "" in roots:
        raise ConfigError(f"{option}={template!r} has an empty {{}} field; name a column, e.g. {{text}}")
    positional = next((r for r in roots if r.isdigit()), None)
    if positional is not None:
        raise ConfigError(f"{option}={template!r} has a positional field {{{positional}}}; name a column, e.g. "
                          f"{{text}}")
    dotted = next((f for f in fields if "." in f.split("[")[0]), None)
    if dotted is not None:  # (format's a.b is getattr: a str's method, never a field of a JSON object)
        column, _, part = dotted.partition(".")
        raise ConfigError(f"{option}={template!r}: {{{dotted}}} reads an attribute; read field {part} of column "
                          f"{column} as {{{column}[{part}]}}")
    if not roots and not allow_constant:
        raise ConfigError(f"{option}={template!r} has no {{column}} field, so every prompt would be the same; "
                          f"e.g. '{{text}} It was'")
    return roots


def render(template: str, row: dict, where: str, option: str = "task.template") -> str:
    """`template` filled from `row`, or a ConfigError naming the row (`where`) and the field at fault."""
    for name in _bare_fields(template):
        value = row.get(name)
        if isinstance(value, (dict, list, tuple)):
            kind = "an object" if isinstance(value, dict) else "a list"
            part = f"{{{name}[{next(iter(value))}]}}" if isinstance(value, dict) and value else f"{{{name}[0]}}"
            raise ConfigError(f"{where}: {option} field {{{name}}} is {kind} ({_short(value)}), which would be pasted "
                              f"into the prompt as Python text; read a part of it, e.g. {part}, or flatten it with "
                              f"task.prepare")
    try:
        return template.format_map(row)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        missing = e.args[0] if isinstance(e, KeyError) else e
        fix = "set task.text_column to the column holding the text" if missing == "text" else \
            "fix the template, or set task.prepare to add it"
        raise ConfigError(f"{where}: {option} field {{{missing}}} is not in the row (has: "
                          f"{', '.join(map(str, row))}); {fix}") from None
    except ValueError as e:  # a format spec the value cannot take ({label:d} of a word)
        raise ConfigError(f"{where}: {option}={template!r} cannot be filled from this row ({e}); fix the "
                          f"field's format") from None


def is_blank(template: str, row: dict) -> bool:
    """True when every column the template reads is empty in `row`: its prompt is the template alone."""
    roots = {f.split(".")[0].split("[")[0] for f in _fields(template)}
    return bool(roots) and all(row.get(r) is None or not str(row.get(r)).strip() for r in roots)


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _bare_fields(template: str) -> list[str]:
    """Fields that read a whole column (no .attribute, no [index])."""
    return [f for f in _fields(template) if "." not in f and "[" not in f]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
