"""`math_accuracy`: is the final boxed answer equal to the gold answer?

Choices (docs/math_reward.md keeps the behaviour of math-verify behind them):
1) Only the text after the last `</think>` is graded, so reasoning drafts cannot earn the reward.
2) Only the last `\\boxed{...}` counts (nested braces handled); no box means 0. math-verify's own extraction
   would also reward unboxed answers (`\\fbox`, "the answer is 12") and joins nearby boxes into sets.
3) Integer golds (AIME) take a fast path: canonical digit strings are compared, no sympy at all.
4) Everything else goes through math-verify with its own alarms when running in a main thread; the hard
   wall-clock kill and memory bound live in `sandbox.py`.
5) A gold answer that math-verify cannot parse gives None (skip the sample) and a `GoldAnswerWarning`, never a
   silent 0; one that parses only as text is graded by exact text match, also with a `GoldAnswerWarning`.
   A math-verify alarm gives 0 and a `RewardTimeoutWarning`, which `RewardPool` counts as a timeout.
6) A boxed answer nested deeper than `MAX_BOX_DEPTH` braces is wrong without parsing: no real answer nests that
   deep, and latex2sympy silently mis-parses such towers (300 nested `\\frac{1}{...}` around 2 parse as 1/2).
7) Numbers are read as TeX writes them: TeX's one-token arguments (`\\frac13`, `\\tfrac12`, `\\sqrt3`) are braced
   before parsing (`expand_tex_shorthand`), and digits are joined only across a valid thousands grouping
   (`10,000`, `10{,}000`, `10\\,000`), never across a space or a `32, 349` pair.

The module is named `math_reward` rather than `math` so that it can never stand in for the stdlib `math` module
(a spawned worker or a script run from inside `rewards/` puts that folder on sys.path).
"""
import functools
import re
import threading
import warnings
from typing import Any

from latex2sympy2_extended import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException
from sse_rl.rewards.sandbox import RewardTimeoutWarning, RewardWarning
from sympy import Basic, MatrixBase

# math-verify's own per-call alarm (whole seconds); the sandbox's wall-clock kill is the hard bound on top.
MATH_VERIFY_TIMEOUT_S = 5
MAX_BOX_DEPTH = 32
BOXED = "\\boxed{"
# math-verify's recommended prediction settings for rewards, with the box as the top-priority anchor.
PRED_CONFIG = [
    LatexExtractionConfig(
        boxed_match_priority=0,
        normalization_config=NormalizationConfig(
            basic_latex=True, units=True, malformed_operators=False, nits=False, boxed="all", equations=False
        ),
    )
]
GOLD_CONFIG = [LatexExtractionConfig(), ExprExtractionConfig()]
# Wrappers that never change an integer's value: \text{..}, $..$, degrees, spaces around it (never inside it).
_INT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_INT_NOISE = re.compile(r"\^\{?\\circ\}?|\$")
_INT_PAD = re.compile(r"^(?:\s|\\[,!; ])+|(?:\s|\\[,!; ])+$")
# Thousands separators (`,`, `{,}`, MATH's `,\!`, a thin space `\,`), valid only where every group after the first
# has exactly 3 digits.
_INT_SEPARATOR = re.compile(r"\{,\}|,\\!\s*|\\,")
_INT = re.compile(r"[+-]?[0-9]{1,3}(,[0-9]{3})+|[+-]?[0-9]+", re.ASCII)
# TeX commands whose arguments may be single tokens: those in group 1 take two arguments, `\sqrt` one.
_SHORTHAND = re.compile(r"\\(?:([dtc]?frac|[dt]?binom)|sqrt)(?![a-zA-Z])")
# The next TeX argument: a group's `{`, a control word (`\pi`), a control symbol, or one character.
_TOKEN = re.compile(r"\s*(\{|\\[a-zA-Z]+|\\.|[^\s{}\\])")
_SQRT_INDEX = re.compile(r"\s*\[[^\[\]]*\]")  # no nested `[`: one pass over `\sqrt[\sqrt[...` stays linear


class GoldAnswerWarning(RewardWarning):
    """The gold answer does not parse (sample skipped: None) or parses only as text (exact text match only)."""


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The generated text, for TRL's standard (str) or conversational (list of messages) completions."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                            for m in completion):
        return "".join(m["content"] for m in completion)
    raise TypeError(
        "a completion must be a string or a list of chat messages with string 'content', "
        f"got {type(completion).__name__}: {str(completion)[:80]!r}"
    )


def answer_text(text: str) -> str:
    """The text after the last `</think>`, or all of it when there is no think block."""
    return text.rpartition("</think>")[2]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, nested braces included; None when absent or never closed.

    >>> last_boxed(r"first \\boxed{1}, then \\boxed{\\frac{1}{2}} done")
    '\\\\frac{1}{2}'
    """
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth = 1
    for i in range(start + len(BOXED), len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(BOXED):i]
    return None


def canonical_int(answer: str) -> str | None:
    """A plain integer answer as a canonical signed digit string ('033' -> '33'); None if it is not one.

    `10,000`, `10{,}000`, `10,\\!000` and `10\\,000` are 10000; `32, 349`, `1,00` and `3 4` are not integers
    (math-verify reads the first two as sets). Strings, not int(), so that a 5000-digit answer cannot hit Python's
    int-parsing limit.
    """
    if len(answer) > 200:
        return None
    s = _INT_SEPARATOR.sub(",", answer.replace("\u2212", "-"))
    s = _INT_PAD.sub("", _INT_NOISE.sub("", _INT_WRAPPER.sub(r"\1", s)))
    if not _INT.fullmatch(s):
        return None
    sign = "-" if s[0] == "-" else ""
    digits = s.lstrip("+-").replace(",", "").lstrip("0") or "0"
    return ("" if digits == "0" else sign) + digits


def expand_tex_shorthand(tex: str) -> str:
    """Brace the one-token arguments TeX allows: `\\frac13` -> `\\frac{1}{3}`, `\\sqrt3` -> `\\sqrt{3}`.

    >>> expand_tex_shorthand(r"\\tfrac12 + \\frac{\\sqrt3}2 - \\frac\\pi4 + \\sqrt[3]2")
    '\\\\tfrac{1}{2} + \\\\frac{\\\\sqrt{3}}{2} - \\\\frac{\\\\pi}{4} + \\\\sqrt[3]{2}'

    Hand-written because math-verify's parser fails on these forms and its `malformed_operators` normalisation is
    not TeX: it reads `\\frac123` as 1/23 (TeX reads `\\frac{1}{2}3`), garbles `\\frac\\pi2` and `\\sqrt\\pi`, and
    also accepts non-TeX such as `sqrt(3)` and `x^(2)`, which this reward keeps wrong.
    """
    inserts: list[tuple[int, str]] = []  # (position in tex, brace), in the order the braces read
    for m in _SHORTHAND.finditer(tex):
        i = m.end()
        if not m.group(1) and tex[i:].lstrip().startswith("["):  # \sqrt[3]8: the index is not an argument
            if (index := _SQRT_INDEX.match(tex, i)) is None:
                continue
            i = index.end()
        for _ in range(2 if m.group(1) else 1):
            token = _TOKEN.match(tex, i)
            if token is None:
                break
            if token.group(1) == "{":
                i = _group_end(tex, token.start(1))
            else:
                inserts += [(token.start(1), "{"), (token.end(1), "}")]
                i = token.end(1)
    out, last = [], 0
    for pos, brace in sorted(inserts, key=lambda p: p[0]):  # stable: `}{` between two arguments stays in order
        out += [tex[last:pos], brace]
        last = pos
    return "".join(out) + tex[last:]


def _group_end(tex: str, start: int) -> int:
    """Index just past the `}` that closes the `{` at `start` (len(tex) when it never closes)."""
    depth = 0
    for k in range(start, len(tex)):
        if tex[k] == "{":
            depth += 1
        elif tex[k] == "}":
            depth -= 1
            if depth == 0:
                return k + 1
    return len(tex)


def brace_depth(text: str) -> int:
    """Deepest `{` nesting in `text` (unbalanced closers are ignored)."""
    depth = deepest = 0
    for ch in text:
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}":
            depth = max(depth - 1, 0)
    return deepest


def _alarm_s() -> int | None:
    """math-verify's SIGALRM timeouts only work in a main thread; elsewhere they must be off."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
    """Parsed gold answer (cached: every group of G completions shares one); () when unparseable."""
    try:
        return tuple(parse(BOXED + expand_tex_shorthand(answer) + "}", GOLD_CONFIG, parsing_timeout=_alarm_s(),
                           raise_on_error=True))
    except (Exception, TimeoutException):  # noqa: BLE001 - any failure means "unparseable", reported by grade
        return ()


def _verify_boxed(gold: tuple, boxed: str) -> float:
    """math-verify on one extracted box: every (gold, prediction) pair, each under its own alarm."""
    try:
        pred = parse(BOXED + expand_tex_shorthand(boxed) + "}", PRED_CONFIG, parsing_timeout=_alarm_s(),
                     raise_on_error=True)
    except TimeoutException:
        warnings.warn(RewardTimeoutWarning(f"math-verify parse alarm ({MATH_VERIFY_TIMEOUT_S} s)"), stacklevel=2)
        return 0.0
    except Exception:  # noqa: BLE001 - a prediction math-verify cannot parse is simply wrong
        return 0.0
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=_alarm_s(), raise_on_error=True):
                    return 1.0
            except TimeoutException:
                warnings.warn(RewardTimeoutWarning(f"math-verify verify alarm ({MATH_VERIFY_TIMEOUT_S} s)"),
                              stacklevel=2)
            except Exception:  # noqa: BLE001, S112 - as math-verify does: a failing pair is not a match
                continue
    return 0.0


def grade(completion: str, answer: str | int) -> float | None:
    """1.0 if the last boxed answer after `</think>` equals `answer`, else 0.0; None if `answer` is unparseable.

    >>> grade(r"<think>maybe \\boxed{7}</think> so \\boxed{033}", "33")
    1.0
    >>> grade(r"The answer is \\boxed{\\dfrac{2}{4}}.", r"\\frac{1}{2}")
    1.0
    >>> grade("The answer is 12.", "12")
    0.0
    """
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        raise TypeError(f"the gold answer must be a string or an int, got {type(answer).__name__}: {answer!r}")
    answer = str(answer)
    gold_int = canonical_int(answer)
    gold = () if gold_int is not None else _parse_gold(answer)
    if gold_int is None and not gold:
        warnings.warn(GoldAnswerWarning(f"unparseable gold answer {answer[:200]!r}: sample skipped"), stacklevel=2)
        return None
    if gold_int is None and not any(isinstance(g, (Basic, MatrixBase)) for g in gold):
        warnings.warn(GoldAnswerWarning(f"gold answer {answer[:200]!r} parses only as text: exact match only"),
                      stacklevel=2)
    boxed = last_boxed(answer_text(completion))
    if boxed is None or brace_depth(boxed) > MAX_BOX_DEPTH:
        return 0.0
    pred_int = canonical_int(boxed)
    if gold_int is not None and pred_int is not None:
        return float(gold_int == pred_int)
    return _verify_boxed(gold or _parse_gold(answer), boxed)


def math_accuracy(prompts: list, completions: list, answer: list[str | int], **columns: Any) -> list[float | None]:
    """TRL reward: `grade` of each completion against the dataset column `answer` (1.0 / 0.0 / None = skip)."""
    if len(answer) != len(completions):
        raise ValueError(f"math_accuracy: {len(completions)} completions but {len(answer)} 'answer' values")
    return [grade(completion_text(c), a) for c, a in zip(completions, answer)]
