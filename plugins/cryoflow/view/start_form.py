"""The session view's "start a session" form: the trigger form with each bad value flagged
beside its field, before and after submit (no Airflow here).

Airflow 3.3's own trigger form shows a value that breaks its Param schema only as one message
at the top of the dialog after submit (tests/test_ui_trigger_form.py keeps that documented).
This form is generated from the same fields (:func:`cryoflow.session.form_params`, itself from
:class:`cryoflow.session.SessionParams`); the browser checks each field as it is left (the same
bounds and patterns, as HTML constraints), and the server checks everything again with
``SessionParams`` and answers each problem by field, shown beside it.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from pydantic import ValidationError

from cryoflow.session import SessionParams, SessionParamsError, form_params

#: fields a SessionParams check after the schema names at the start of its message
_EXTRA_CHECKS = ("collaborators", "source_folder", "end_time")


def _types(spec: dict[str, Any]) -> tuple[str, bool]:
    """(the JSON type, whether the field may be left empty)."""
    kinds = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
    real = [k for k in kinds if k != "null"]
    return (real[0] if real else "string"), "null" in kinds


def _rule(spec: dict[str, Any]) -> str:
    """The field's rule in words, shown under it and in its error."""
    words = []
    for key, text in (("minimum", "≥ {}"), ("exclusiveMinimum", "> {}"),
                      ("maximum", "≤ {}"), ("exclusiveMaximum", "< {}")):  # fmt: skip
        if key in spec:
            words.append(text.format(spec[key]))
    return " and ".join(words)


def field_html(name: str, spec: dict[str, Any]) -> str:
    kind, optional = _types(spec)
    title = escape(spec.get("title") or name)
    help_text = spec.get("description") or ""
    rule = _rule(spec)
    if kind in ("number", "integer") and rule:
        help_text = f"{help_text} {'A whole number ' if kind == 'integer' else ''}{rule}.".strip()
    attrs = [f'name="{escape(name)}"', f'id="f-{escape(name)}"',
             f'aria-describedby="err-{escape(name)}"']  # fmt: skip
    default = spec.get("default")
    if kind == "boolean":
        checked = " checked" if default else ""
        control = f'<input type="checkbox" {" ".join(attrs)}{checked}>'
    else:
        if kind in ("number", "integer"):
            attrs.append('type="number"')
            attrs.append('step="1"' if kind == "integer" else 'step="any"')
            for key, attr in (("minimum", "min"), ("maximum", "max")):
                if key in spec:
                    attrs.append(f'{attr}="{spec[key]}"')
            for key in ("exclusiveMinimum", "exclusiveMaximum"):
                if key in spec:
                    attrs.append(f'data-{key.lower()}="{spec[key]}"')
        else:
            attrs.append('type="text"')
            if "pattern" in spec:
                bare = spec["pattern"].removeprefix("^").removesuffix("$")
                attrs.append(f'data-pattern="{escape(bare)}"')
        if kind == "array":
            attrs.append('data-list="1"')
            value = ", ".join(default or [])
        else:
            value = "" if default is None else str(default)
        attrs.append(f'value="{escape(value)}"')
        if not optional:
            attrs.append("required")
        if rule:
            attrs.append(f'data-rule="{escape(rule)}"')
        control = f"<input {' '.join(attrs)}>"
    optional_mark = ' <span class="muted">(optional)</span>' if optional else ""
    return (
        f'<div class="field" data-field="{escape(name)}"><label for="f-{escape(name)}">'
        f"{title}{optional_mark}</label>{control}"
        f'<span class="err" id="err-{escape(name)}" role="alert" aria-live="polite"></span>'
        f'<div class="hint muted">{escape(help_text)}</div></div>'
    )


def form_html(scope: Any, action: str) -> str:
    """The form's HTML for microscope ``scope`` (its defaults from the microscope's YAML)."""
    fields = "".join(field_html(name, spec) for name, spec in form_params(scope).items())
    return (
        f'<form class="start" data-start-url="{escape(action)}" novalidate>{fields}'
        '<p><button type="submit" class="start">Start session</button>'
        '<span id="start-result" aria-live="polite"></span></p></form>'
    )


def clean_values(scope: Any, values: dict[str, Any]) -> dict[str, Any]:
    """What the browser sent, typed as the Params expect: empty text of an optional field is
    None (the default applies), numbers as numbers where they parse, lists from comma text."""
    specs = form_params(scope)
    out: dict[str, Any] = {}
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None:
            continue  # unknown fields are dropped, not passed to the DAG
        kind, optional = _types(spec)
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                value = None if optional else ""
            elif kind == "array":
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif kind in ("number", "integer"):
                try:
                    number = float(value)
                except ValueError:
                    pass  # the check names it
                else:
                    value = int(number) if kind == "integer" and number.is_integer() else number
        if value is None and kind == "array":
            value = []
        out[name] = value
    return out


def field_errors(scope: Any, values: dict[str, Any]) -> dict[str, str]:
    """Each problem of ``values`` by field (empty: they start a session). A field not given
    takes the form's default, as the DAG's Params do."""
    values = {**{n: spec["default"] for n, spec in form_params(scope).items()}, **values}
    try:
        SessionParams.model_validate(values)
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for e in exc.errors():
            name = str(e["loc"][0]) if e["loc"] else "form"
            errors.setdefault(name, e["msg"])
        return errors
    try:
        SessionParams.from_form(values)
    except SessionParamsError as exc:
        text = str(exc)
        for name in _EXTRA_CHECKS:
            if text.startswith(f"{name}:"):
                return {name: text.removeprefix(f"{name}:").strip()}
        return {"form": text}
    return {}


def conf_of(values: dict[str, Any]) -> dict[str, Any]:
    """The run's conf: the cleaned values (JSON-able, as the trigger form would send them)."""
    return json.loads(json.dumps(values))


__all__ = ["clean_values", "conf_of", "field_errors", "field_html", "form_html"]
