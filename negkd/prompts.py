"""Every prompt negkd builds.

Training/inference sequence format (method.md §2): ``prompt = template(question)`` and
``completion = rationale + eos``. The default template is the reference data's
``"Problem:\\n{question}\\nSolution:\\n"``. With ``chat_template=True`` the rendered user
message is wrapped in the tokenizer's own chat template (instruct-tuned models), with the
generation prompt appended, so the completion is the assistant turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from negkd.errors import UserError

DEFAULT_TEMPLATE = "Problem:\n{question}\nSolution:\n"

# Built-in templates for the student's sequence format, by name.
TEMPLATES: dict[str, str] = {
    "default": DEFAULT_TEMPLATE,
    "plain": "{question}\n",
}


def load_template(spec: str | None) -> str:
    """A built-in template name, a path to a text file, or a literal string with ``{question}``."""
    if spec is None or spec == "":
        return DEFAULT_TEMPLATE
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    p = Path(spec)
    if "\n" not in spec and len(spec) < 4096 and p.is_file():
        text = p.read_text(encoding="utf-8")
    else:
        text = spec
    if "{question}" not in text:
        raise UserError(
            f"prompt template {spec!r} is not a built-in ({', '.join(TEMPLATES)}), an existing file, "
            "or a string containing {question}"
        )
    return text


def render(template: str, problem: dict[str, Any]) -> str:
    """Fill ``{question}`` (and any other ``{field}`` of the problem) into the template."""
    try:
        return template.format_map(_Fields(problem))
    except (ValueError, IndexError) as e:
        raise UserError(f"prompt template is not a valid format string ({e}); escape literal braces as {{{{ }}}}") from None


class _Fields(dict):
    def __init__(self, problem: dict[str, Any]):
        super().__init__(problem)

    def __missing__(self, key: str) -> str:
        raise UserError(f"prompt template uses {{{key}}} but the problem has no field {key!r}")


def build_prompt(problem: dict[str, Any], template: str, tokenizer=None, chat_template: bool = False,
                 system: str | None = None) -> str:
    """The text the student sees before its rationale."""
    text = render(template, problem)
    if not chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template needs a tokenizer that ships a chat template (an instruct model); "
                        "drop --chat-template for base models")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
