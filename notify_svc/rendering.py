"""Renders a template into subject, HTML and text with Jinja2.

HTML is autoescaped, so a variable can never inject markup; the subject is one
line with control characters removed, so a variable can never inject a header.
Missing variables in a template are errors (StrictUndefined), not blank text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2

from notify_svc.catalog import TEMPLATE_DIR, TemplateSpec

_MESSAGES = {
    "en": {
        "footer": "You receive this email because of your opsmesh account. "
        "opsmesh never asks for your password by email.",
    },
    "de": {
        "footer": "Sie erhalten diese E-Mail wegen Ihres opsmesh-Kontos. "
        "opsmesh fragt nie per E-Mail nach Ihrem Passwort.",
    },
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_SUBJECT = 250


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    subject: str
    html: str
    text: str
    locale: str


def _money(amount: float, currency: str) -> str:
    return f"{amount:,.2f} {currency.upper()}"


def _datetime(value: str) -> str:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment.strftime("%Y-%m-%d %H:%M %Z").strip()


class Renderer:
    def __init__(self) -> None:
        loader = jinja2.FileSystemLoader(TEMPLATE_DIR)
        common: dict[str, Any] = {
            "loader": loader,
            "undefined": jinja2.StrictUndefined,
            "trim_blocks": True,
            "keep_trailing_newline": True,
        }
        self._html = jinja2.Environment(autoescape=True, **common)
        self._text = jinja2.Environment(autoescape=False, **common)  # noqa: S701 - plain text
        for environment in (self._html, self._text):
            environment.filters["money"] = _money
            environment.filters["datetime"] = _datetime

    def render(self, spec: TemplateSpec, locale: str, data: dict[str, Any]) -> RenderedEmail:
        messages = _MESSAGES.get(locale, _MESSAGES["en"])
        context = {**data, "locale": locale, "_": lambda key: messages[key]}
        base = f"{spec.id}/{locale}"
        subject = self._text.get_template(f"{base}/subject.txt").render(context)
        subject = " ".join(_CONTROL.sub(" ", subject).split())[:_MAX_SUBJECT]
        html = self._html.get_template(f"{base}/body.html").render(subject=subject, **context)
        text = self._text.get_template(f"{base}/body.txt").render(context)
        return RenderedEmail(subject=subject, html=html, text=text, locale=locale)
