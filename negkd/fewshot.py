"""Teacher prompts for ``negkd sample``: built-in few-shot chain-of-thought prompts and custom ones.

A :class:`TeacherPrompt` is an instruction, a few worked examples and a question template. It
renders two ways:

- ``--api chat``: a system message (the instruction), then each example as a user turn
  (``Problem:\\n<question>``) and an assistant turn (its rationale), then the user's problem;
  the server applies the model's own chat template.
- ``--api completions`` (base models, or ``--backend hf`` without ``--chat-template``): one text,
  ``instruction + "Problem:\\n...\\nSolution:\\n<rationale>\\n\\n" * k + "Problem:\\n<q>\\nSolution:\\n"``,
  with the stop sequence ``"\\n\\nProblem:"`` so the model does not write the next problem.

Built-ins (the demonstrations are original, written for negkd, and checked by hand):

- ``math``: MATH-style problems over five subjects; every rationale ends in ``\\boxed{}``, the
  answer form negkd's grader reads first, and the form of the paper's teacher data.
- ``gsm8k``: grade-school word problems; rationales end "The answer is $\\boxed{N}$.".
- ``zero-shot``: the instruction and the problem only.

A custom ``--prompt`` is a JSON file ``{"instruction": str, "examples": [{"question", "rationale"}],
"template": "Problem:\\n{question}\\n", "answer_prefix": "Solution:\\n", "stop": [...]}`` (every
key optional except that it must give examples or an instruction), or a text file / literal
string containing ``{question}`` used as a zero-shot template. A template may use any other
``{field}`` of the problem too (examples are shown with the problem's fields and their own question).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from negkd.errors import UserError
from negkd.prompts import render

MATH_INSTRUCTION = (
    "Solve the math problem step by step. Explain each step briefly, and give the final answer "
    "in simplest form inside \\boxed{} at the end."
)
GSM8K_INSTRUCTION = (
    "Solve the word problem step by step, showing the arithmetic of each step. End with "
    "\"The answer is $\\boxed{N}$.\" where N is the final number."
)

MATH_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "If $3x + 7 = 25$, what is the value of $6x - 4$?",
        "Subtracting 7 from both sides of $3x + 7 = 25$ gives $3x = 18$, so $x = 6$. "
        "Then $6x - 4 = 6 \\cdot 6 - 4 = 36 - 4 = 32$. The answer is $\\boxed{32}$.",
    ),
    (
        "Two fair six-sided dice are rolled. What is the probability that the sum of the two numbers "
        "rolled is 9? Express your answer as a common fraction.",
        "There are $6 \\cdot 6 = 36$ equally likely outcomes. The ordered pairs with sum 9 are "
        "$(3,6)$, $(4,5)$, $(5,4)$ and $(6,3)$, which is 4 outcomes. The probability is "
        "$\\frac{4}{36} = \\frac{1}{9}$. The answer is $\\boxed{\\frac{1}{9}}$.",
    ),
    (
        "A right triangle has legs of length 6 and 8. What is the radius of the circle inscribed in "
        "the triangle?",
        "The hypotenuse is $\\sqrt{6^2 + 8^2} = \\sqrt{100} = 10$. The area is "
        "$\\frac{1}{2} \\cdot 6 \\cdot 8 = 24$ and the semiperimeter is $\\frac{6 + 8 + 10}{2} = 12$. "
        "For any triangle, area $=$ inradius $\\times$ semiperimeter, so the inradius is "
        "$\\frac{24}{12} = 2$. The answer is $\\boxed{2}$.",
    ),
    (
        "What is the remainder when $2^{100}$ is divided by 7?",
        "Since $2^3 = 8 \\equiv 1 \\pmod{7}$, the powers of 2 repeat with period 3 modulo 7. "
        "As $100 = 3 \\cdot 33 + 1$, we get $2^{100} = (2^3)^{33} \\cdot 2 \\equiv 1^{33} \\cdot 2 = 2 "
        "\\pmod{7}$. The answer is $\\boxed{2}$.",
    ),
    (
        "Find the domain of the function $f(x) = \\frac{\\sqrt{x - 2}}{x - 5}$. Express your answer in "
        "interval notation.",
        "The square root needs $x - 2 \\ge 0$, so $x \\ge 2$. The denominator must not be zero, so "
        "$x \\ne 5$. Together, the domain is $[2, 5) \\cup (5, \\infty)$. The answer is "
        "$\\boxed{[2,5)\\cup(5,\\infty)}$.",
    ),
)

GSM8K_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "A baker makes 48 muffins. She sells 3/4 of them in the morning and half of the remaining "
        "muffins in the afternoon. How many muffins are left at the end of the day?",
        "In the morning she sells 48 * 3/4 = 36 muffins, so 48 - 36 = 12 are left. In the afternoon "
        "she sells half of them, 12 / 2 = 6, so 12 - 6 = 6 muffins are left. The answer is $\\boxed{6}$.",
    ),
    (
        "Tom buys 3 notebooks for $4 each and 2 pens for $1.50 each. He pays with a $20 bill. "
        "How much change does he get, in dollars?",
        "The notebooks cost 3 * 4 = 12 dollars and the pens cost 2 * 1.50 = 3 dollars, so he spends "
        "12 + 3 = 15 dollars. His change is 20 - 15 = 5 dollars. The answer is $\\boxed{5}$.",
    ),
    (
        "A train travels at 60 miles per hour for 2.5 hours and then at 40 miles per hour for "
        "1.5 hours. How many miles does it travel in total?",
        "In the first part it travels 60 * 2.5 = 150 miles. In the second part it travels "
        "40 * 1.5 = 60 miles. In total it travels 150 + 60 = 210 miles. The answer is $\\boxed{210}$.",
    ),
    (
        "Maria is 4 years older than twice her brother's age. Her brother is 7 years old. How old "
        "will Maria be in 5 years?",
        "Twice her brother's age is 2 * 7 = 14, so Maria is 14 + 4 = 18 years old now. In 5 years "
        "she will be 18 + 5 = 23. The answer is $\\boxed{23}$.",
    ),
)


@dataclass(frozen=True)
class TeacherPrompt:
    """An instruction + worked examples + how to show one problem (see the module docstring)."""

    name: str
    instruction: str = ""
    examples: tuple[tuple[str, str], ...] = ()
    template: str = "Problem:\n{question}\n"
    answer_prefix: str = "Solution:\n"
    stop: tuple[str, ...] = field(default=("\n\nProblem:",))

    def question(self, problem: dict[str, Any]) -> str:
        return render(self.template, problem)

    def chat_messages(self, problem: dict[str, Any]) -> list[dict[str, str]]:
        """System instruction, examples as user/assistant turns, then the problem."""
        msgs: list[dict[str, str]] = []
        if self.instruction:
            msgs.append({"role": "system", "content": self.instruction})
        for q, r in self.examples:
            msgs.append({"role": "user", "content": render(self.template, {**problem, "question": q}).strip()})
            msgs.append({"role": "assistant", "content": r})
        msgs.append({"role": "user", "content": self.question(problem).strip()})
        return msgs

    def completion_text(self, problem: dict[str, Any]) -> str:
        """One plain-text prompt for a base model; the rationale continues it."""
        parts = [self.instruction + "\n\n"] if self.instruction else []
        for q, r in self.examples:
            parts.append(render(self.template, {**problem, "question": q}) + self.answer_prefix + r + "\n\n")
        parts.append(self.question(problem) + self.answer_prefix)
        return "".join(parts)

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the prompt."""
        return {"name": self.name, "examples": len(self.examples)}


BUILTIN: dict[str, TeacherPrompt] = {
    "math": TeacherPrompt("math", MATH_INSTRUCTION, MATH_EXAMPLES),
    "gsm8k": TeacherPrompt("gsm8k", GSM8K_INSTRUCTION, GSM8K_EXAMPLES),
    "zero-shot": TeacherPrompt("zero-shot", MATH_INSTRUCTION, ()),
}


def load_prompt(spec: str) -> TeacherPrompt:
    """A built-in name, a JSON prompt file, or a text file / string holding ``{question}``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    p = Path(spec)
    is_file = "\n" not in spec and len(spec) < 4096 and p.is_file()
    if is_file and p.suffix == ".json":
        return _from_json(p)
    text = p.read_text(encoding="utf-8") if is_file else spec
    if "{question}" not in text:
        if not is_file and "{" not in spec and "\n" not in spec:
            raise UserError(f"--prompt {spec!r}: not a built-in prompt ({', '.join(BUILTIN)}) and no such file")
        raise UserError(f"--prompt {spec!r}: a template must contain {{question}}")
    return TeacherPrompt(name=str(p) if is_file else "custom", instruction="", examples=(), template=text,
                         answer_prefix="", stop=())


def _from_json(path: Path) -> TeacherPrompt:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a valid UTF-8 JSON prompt file ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: a prompt file must hold a JSON object with 'instruction' and/or 'examples'")
    unknown = set(obj) - {"instruction", "examples", "template", "answer_prefix", "stop"}
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected instruction, examples, "
                        "template, answer_prefix, stop")
    examples = []
    for i, ex in enumerate(obj.get("examples", [])):
        if not (isinstance(ex, dict) and isinstance(ex.get("question"), str) and isinstance(ex.get("rationale"), str)):
            raise UserError(f"{path}: examples[{i}] must be an object with string 'question' and 'rationale'")
        examples.append((ex["question"], ex["rationale"]))
    instruction = obj.get("instruction", "")
    if not isinstance(instruction, str):
        raise UserError(f"{path}: 'instruction' must be a string")
    if not instruction and not examples:
        raise UserError(f"{path}: give an 'instruction', 'examples', or both")
    template = obj.get("template", "Problem:\n{question}\n")
    if not isinstance(template, str) or "{question}" not in template:
        raise UserError(f"{path}: 'template' must be a string containing {{question}}")
    stop = obj.get("stop", ["\n\nProblem:"])
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)) or len(stop) > 4:
        raise UserError(f"{path}: 'stop' must be a list of at most 4 non-empty strings")
    answer_prefix = obj.get("answer_prefix", "Solution:\n")
    if not isinstance(answer_prefix, str):
        raise UserError(f"{path}: 'answer_prefix' must be a string")
    return TeacherPrompt(name=str(path), instruction=instruction, examples=tuple(examples), template=template,
                         answer_prefix=answer_prefix, stop=tuple(stop))
