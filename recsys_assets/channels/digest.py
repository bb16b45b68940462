"""The weekly digest's text: a summary grounded only in the items of the subject's plan row.

The text is filled from templates (data, below), never generated: every sentence about an
item names an item of the plan row, which holds only what passed the final check at send
time, so an item the check dropped cannot appear. The template is chosen by the user's
raw `users.locale` (its language, e.g. `de-AT` → `de`), English where no template exists.
`DIGEST_TEMPLATE_VERSION` is recorded on the plan and decision-log rows and in the message,
so any sent text can be traced to the template that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DIGEST_SURFACES = ("digest_weekly",)
DIGEST_TEMPLATE_VERSION = "digest_v1"
DEFAULT_LOCALE = "en"


@dataclass(frozen=True)
class DigestTemplate:
    subject: str
    intro: str
    """`{count}`: the number of items."""
    line: str
    """`{rank}`, `{title}`, `{link}` per item."""
    outro: str


TEMPLATES: dict[str, DigestTemplate] = {
    "en": DigestTemplate(
        "Your week: {count} picks",
        "Here are {count} things we picked for you this week:",
        "{rank}. {title} — {link}",
        "You get this digest because you subscribed to weekly emails.",
    ),
    "de": DigestTemplate(
        "Ihre Woche: {count} Empfehlungen",
        "Diese {count} Dinge haben wir diese Woche für Sie ausgewählt:",
        "{rank}. {title} — {link}",
        "Sie erhalten diese Übersicht, weil Sie wöchentliche E-Mails abonniert haben.",
    ),
    "fr": DigestTemplate(
        "Votre semaine : {count} suggestions",
        "Voici {count} choix pour vous cette semaine :",
        "{rank}. {title} — {link}",
        "Vous recevez ce résumé car vous êtes abonné aux e-mails hebdomadaires.",
    ),
    "es": DigestTemplate(
        "Tu semana: {count} recomendaciones",
        "Estas son {count} cosas que elegimos para ti esta semana:",
        "{rank}. {title} — {link}",
        "Recibes este resumen porque te suscribiste a los correos semanales.",
    ),
}


def is_digest(surface: str) -> bool:
    return surface in DIGEST_SURFACES


def template_locale(locale: str | None) -> str:
    """The template language for a BCP 47 locale (`pt-BR` → `pt`), or English."""
    language = str(locale or "").split("-")[0].split("_")[0].lower()
    return language if language in TEMPLATES else DEFAULT_LOCALE


@dataclass(frozen=True)
class DigestItem:
    item_id: int
    title: str | None
    link: str


def render_digest(items: Sequence[DigestItem], locale: str) -> tuple[str, str]:
    """(subject line, body) for `items` in message order, in `locale`'s template."""
    template = TEMPLATES[template_locale(locale)]
    lines = [
        template.line.format(rank=rank, title=item.title or f"#{item.item_id}", link=item.link)
        for rank, item in enumerate(items, start=1)
    ]
    body = "\n".join([template.intro.format(count=len(items)), "", *lines, "", template.outro])
    return template.subject.format(count=len(items)), body
