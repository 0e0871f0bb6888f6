"""The evaluation's prompts, by the LyCORIS paper's prompt types.

* ``train``: the training captions, as they are;
* ``trigger``: the trigger phrase alone (e.g. "sks dog");
* ``alter``: content-alteration templates ("{} in a chef's outfit, cooking in a kitchen");
* ``style``: style templates ("{} in the style of watercolor painting"), also the prompts on which the
  fine-tuned model is compared with its base (base-model preservation).

A template's ``{}`` is filled with the trigger; a template without one is a fixed prompt.  Every prompt also
has a *plain* form, the trigger rewritten to plain words ("sks dog" → "dog"), for CLIP's text similarity:
an encoder has never seen the made-up trigger word.

Image ``k`` of a type uses prompt ``k mod P`` and seed ``k``: every model evaluated gets the same seeds,
image for image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PROMPT_TYPES = ("train", "trigger", "alter", "style")
#: the types a template file may set (``train`` comes from the captions)
TEMPLATE_TYPES = ("trigger", "alter", "style")

DEFAULT_TEMPLATES: dict[str, list[str]] = {
    "trigger": ["{}"],
    "alter": [
        "{} in a chef's outfit, cooking in a kitchen",
        "{} under a star-filled night sky",
        "{} floating in a swimming pool",
        "{} wearing a red scarf in the snow",
        "{} on a wooden table beside a cup of tea",
        "{} in a crowded city street at noon",
    ],
    "style": [
        "{} in the style of watercolor painting",
        "{} as pixel art",
        "{} in the style of a charcoal sketch",
        "{} as a low-poly 3D render",
        "{} in the style of an ukiyo-e woodblock print",
        "{} as a stained-glass window",
    ],
}

#: the built-in demo model knows "a <colour> <shape>" and nothing else: its alterations change the
#: concept's colour, and its style prompts are held-out prompts of the base vocabulary without the concept,
#: where an adapter that bleeds changes what the base drew
DEMO_TRIGGER = "yellow cross"
DEMO_TEMPLATES: dict[str, list[str]] = {
    "trigger": ["a {}"],
    "alter": ["a red cross", "a green cross", "a blue cross"],
    "style": ["a red circle", "a green square", "a blue circle", "a red square", "a green circle", "a blue square"],
}


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one prompt type: ``prompts`` conditions the model, ``plain`` (same length) is what CLIP
    reads for text similarity."""

    kind: str
    prompts: list[str]
    plain: list[str]

    def prompt_of(self, image: int) -> int:
        """The index of the prompt image ``image`` uses."""
        return image % len(self.prompts)


def default_plain(trigger: str) -> str:
    """The trigger in plain words: without its first word when it has several ("sks dog" → "dog"), else
    itself."""
    words = trigger.split()
    return " ".join(words[1:]) if len(words) > 1 else trigger


def load_templates(path: str | Path) -> dict[str, list[str]]:
    """Templates from a TOML file: ``trigger``, ``alter`` and/or ``style``, each a non-empty list of strings
    (a type the file leaves out keeps its default)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--templates {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--templates {path} is not valid TOML: {error}") from None
    unknown = sorted(set(data) - set(TEMPLATE_TYPES))
    if unknown:
        raise ValueError(
            f"--templates {path}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(TEMPLATE_TYPES)})"
        )
    for key, value in data.items():
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"--templates {path}: {key} must be a non-empty list of non-empty strings")
    return data


def _fill(template: str, phrase: str) -> str:
    return template.replace("{}", phrase)


def build_prompt_sets(
    trigger: str,
    plain: str,
    captions: list[str],
    templates: dict[str, list[str]],
    kinds: tuple[str, ...] = PROMPT_TYPES,
) -> dict[str, PromptSet]:
    """The prompt sets of ``kinds``; ``train`` uses the distinct ``captions`` (in order), the others
    ``templates``; each prompt's plain form puts ``plain`` where ``trigger`` stood.  ``train`` is left out
    when there are no captions (the caller says why)."""
    sets: dict[str, PromptSet] = {}
    for kind in kinds:
        if kind == "train":
            distinct = list(dict.fromkeys(captions))
            if distinct:
                sets[kind] = PromptSet(kind, distinct, [c.replace(trigger, plain) for c in distinct])
            continue
        if kind not in templates:
            raise ValueError(f"unknown prompt type {kind!r} (known: {', '.join(PROMPT_TYPES)})")
        chosen = templates[kind]
        sets[kind] = PromptSet(kind, [_fill(t, trigger) for t in chosen], [_fill(t, plain) for t in chosen])
    return sets
