"""Languages of pages and mail: Babel catalogues under translations/, English as the fallback.

Templates are written in English (the message ids); `translations/<lang>/LC_MESSAGES/messages.po`
holds each other language. The .po files are compiled in memory when first used, so a clean
checkout needs no build step; a string missing from a catalogue shows in English.
After changing a template's text (see babel.cfg for the commands):
  pybabel extract -F babel.cfg -o translations/messages.pot --no-location --sort-output .
  pybabel update -i translations/messages.pot -d translations -w 100 --ignore-obsolete
then translate what is new or marked fuzzy; tests/test_i18n.py fails until every string is.
"""

from __future__ import annotations

import gettext
import io
from functools import lru_cache
from typing import Any

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from jinja2 import Environment, pass_context
from jinja2.runtime import Context

from service.config import PROJECT_ROOT

TRANSLATIONS_DIR = PROJECT_ROOT / "translations"
DEFAULT_LANGUAGE = "en"
LANGUAGES = ("en", "uk")
MAX_TAG = 16  # a stored language tag (subscribers, newsletters)


def is_tag(value: str) -> bool:
    """A language tag as the service stores one: letters, digits and dashes, at most MAX_TAG
    (a tag it has no translation for is kept, and pages and mail fall back to English)."""
    return len(value) <= MAX_TAG and value.replace("-", "").isalnum()


def supported(tag: str | None) -> str | None:
    """The language we have for a tag like `uk`, `uk-UA` or `UK_ua`, or None."""
    if not tag:
        return None
    primary = tag.strip().replace("_", "-").split("-", 1)[0].lower()
    return primary if primary in LANGUAGES else None


def negotiate(accept_language: str | None) -> str:
    """Pick a language from an Accept-Language header by its q-values; English otherwise."""
    choices: list[tuple[float, int, str]] = []
    for position, item in enumerate((accept_language or "").split(",")[:20]):
        tag, _, params = item.partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        language = supported(tag)
        if language and quality > 0:
            choices.append((-quality, position, language))
    return min(choices)[2] if choices else DEFAULT_LANGUAGE


@lru_cache(maxsize=len(LANGUAGES))
def catalogue(language: str) -> gettext.NullTranslations:
    """The compiled catalogue of a language; English (the message ids) has none."""
    if language == DEFAULT_LANGUAGE or language not in LANGUAGES:
        return gettext.NullTranslations()
    path = TRANSLATIONS_DIR / language / "LC_MESSAGES" / "messages.po"
    if not path.exists():
        return gettext.NullTranslations()
    with path.open("rb") as handle:
        catalog = read_po(handle, locale=language)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)  # fuzzy and empty entries are left out: they fall back
    compiled.seek(0)
    return gettext.GNUTranslations(compiled)


def _language(context: Context) -> str:
    value = context.get("lang")
    return value if isinstance(value, str) else DEFAULT_LANGUAGE


@pass_context
def _gettext(context: Context, message: str) -> str:
    return catalogue(_language(context)).gettext(message)


@pass_context
def _ngettext(context: Context, singular: str, plural: str, n: int) -> str:
    return catalogue(_language(context)).ngettext(singular, plural, n)


def install(env: Environment) -> None:
    """Give an environment `_`, `gettext` and `{% trans %}` in the language of each render.

    The language is the `lang` variable of the render's context, so one environment serves
    every language at once without shared mutable state.
    """
    env.add_extension("jinja2.ext.i18n")
    env.policies["ext.i18n.trimmed"] = True
    installer: Any = env
    installer.install_gettext_callables(_gettext, _ngettext, newstyle=True)
