"""English text that ships with Python, for calibrating and recovering language models offline.

Three sources, all present on every machine with Python and the same for a given Python version:

* `reference_sentences`: the prose sentences of the Python language reference (`pydoc_data.topics`),
  in a fixed shuffled order. The benchmarks and ``python -m torchprune compress`` hold out the first
  of them to measure quality.
* `docstring_sentences`: the prose sentences of the docstrings of the standard library's modules,
  read with `ast` (nothing is imported), about 7,000 of them (about 9,000 with the test suite's).
* `comment_sentences`: the prose sentences of the standard library's full-line ``#`` comments,
  about 6,500 more.

`package_sentences` reads the same two kinds of prose from installed packages (e.g. torch and
transformers: about 30,000 more sentences), for a caller that wants more text; on MiniLM at 80% it
did not help (held-out cosine 0.937 with them against 0.940 without, after 4,300 steps).

`training_corpus` puts them together for distillation: a recovery of a few thousand steps goes over
7,000 sentences many times, and a student distilled on them matched the teacher on its training
sentences much better than on held-out ones (MiniLM at 80%: cosine 0.960 against 0.927), so the
comments and the tests' docstrings double the text it learns from.

A sentence is kept when it is plain prose of 8-40 words (starts upper-case, ends with a period, no
code, markup or non-ASCII), so the sources read alike. `text_file_sentences` reads a user's
own file, one text per non-empty line.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import random
import re
import sysconfig
from typing import Dict, Iterable, List, Sequence, Tuple

__all__ = ["reference_sentences", "docstring_sentences", "comment_sentences", "package_sentences", "package_folder",
           "training_corpus", "text_file_sentences", "split", "digest"]

MIN_WORDS, MAX_WORDS = 8, 40
SEED = 0  # the order of the sentences: a fixed shuffle, so any prefix mixes all topics

_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")  # *word* and **word**, as pydoc renders reST
_HEADING_RULE = re.compile(r"[*=\-~^+#]{3,}")
_CODE_LIKE = re.compile(r"[{}\[\]<>=|\\`~@#$%^&_*]|::|\.\.\.|\w\(|\)\w|https?:|>>>")
_QUOTED = re.compile(r'"([^"]*)"')
_PLAIN_QUOTE = re.compile(r"[A-Za-z][A-Za-z0-9 .\-]*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BLANK_LINES = re.compile(r"\n\s*\n")
# folders that are not the standard library's own files
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}
# and those whose docstrings are tests, demos or vendored packages, not library prose
_SKIPPED_FOLDERS = _NOT_STDLIB | {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip"}


def _paragraphs(text: str) -> List[str]:
    """The prose paragraphs of one rendered reST page: indented blocks (code, grammar, tables),
    headings and their underlines dropped; each paragraph's lines joined."""
    paragraphs, block = [], []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        underline = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if (not line.strip() or line[0].isspace() or _HEADING_RULE.fullmatch(line.strip())
                or _HEADING_RULE.fullmatch(underline)):
            if block:
                paragraphs.append(" ".join(block))
            block = []
        else:
            block.append(line.strip())
    if block:
        paragraphs.append(" ".join(block))
    return paragraphs


def _clean(sentence: str):
    """``sentence`` without reST emphasis, or None when it is not plain prose of 8-40 words."""
    sentence = _EMPHASIS.sub(r"\1", sentence.replace("\u2019", "'"))
    sentence = re.sub(r"(\w)- (\w)", r"\1-\2", sentence)  # a word hyphenated across a line break
    words = len(sentence.split())
    if not (MIN_WORDS <= words <= MAX_WORDS and sentence[:1].isupper() and sentence.endswith(".")):
        return None
    if not sentence.isascii() or _CODE_LIKE.search(sentence):
        return None
    if any(not _PLAIN_QUOTE.fullmatch(quoted) for quoted in _QUOTED.findall(sentence)):
        return None  # a quoted code fragment such as "';'"
    return sentence


def _add_sentences(paragraphs: Iterable[str], found: Dict[str, None]) -> None:
    for paragraph in paragraphs:
        for piece in _SENTENCE_END.split(paragraph):
            sentence = _clean(piece.strip())
            if sentence is not None:
                found.setdefault(sentence)


def _shuffled(found: Dict[str, None]) -> List[str]:
    ordered = list(found)
    random.Random(SEED).shuffle(ordered)
    return ordered


def reference_sentences() -> List[str]:
    """Every usable sentence of the Python language reference shipped with Python, deduplicated,
    in a fixed shuffled order (about 670 on Python 3.11; `digest` identifies a list)."""
    from pydoc_data.topics import topics

    found: Dict[str, None] = {}
    for key in sorted(topics):
        _add_sentences(_paragraphs(topics[key]), found)
    return _shuffled(found)


def _docstrings(path: str) -> Iterable[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield text


def _python_files(root: str, skipped) -> Iterable[str]:
    """The ``.py`` files under ``root`` in a fixed order, folders named in ``skipped`` left out."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in skipped)
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _stdlib_files(skipped) -> Iterable[str]:
    """The standard library's ``.py`` files in a fixed order, folders named in ``skipped`` left out."""
    return _python_files(sysconfig.get_paths()["stdlib"], skipped)


def _docstring_paragraphs(path: str) -> Iterable[str]:
    """The paragraphs of every docstring of one file, each paragraph's lines joined."""
    for text in _docstrings(path):
        for block in _BLANK_LINES.split(text):
            yield " ".join(line.strip() for line in block.splitlines())


def _docstring_sentences(tests: bool) -> Tuple[Dict[str, None], Dict[str, None]]:
    """The docstring sentences of the library's own folders, and (with ``tests``) those found only
    in its tests, IDLE and demos: one walk, each file parsed once."""
    root = sysconfig.get_paths()["stdlib"]
    library: Dict[str, None] = {}
    others: Dict[str, None] = {}
    for path in _stdlib_files(_NOT_STDLIB if tests else _SKIPPED_FOLDERS):
        outside = not _SKIPPED_FOLDERS.isdisjoint(os.path.relpath(path, root).split(os.sep)[:-1])
        _add_sentences(_docstring_paragraphs(path), others if outside else library)
    return library, {sentence: None for sentence in others if sentence not in library}


def docstring_sentences(tests: bool = False) -> List[str]:
    """Every usable sentence of the docstrings of the standard library's ``.py`` files (with
    ``tests``, those of its test suite, IDLE and demos too; site-packages never), deduplicated, in a
    fixed shuffled order. Parsed, not imported; takes a few seconds."""
    library, others = _docstring_sentences(tests)
    return _shuffled({**library, **others})


def _comment_paragraphs(path: str) -> Iterable[str]:
    """The runs of consecutive full-line ``#`` comments of one file, each joined into a paragraph."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (UnicodeDecodeError, OSError):
        return
    block: List[str] = []
    for line in lines + [""]:
        body = line.strip()
        text = body.lstrip("#").strip() if body.startswith("#") else ""
        if text:
            block.append(text)
        elif block:
            yield " ".join(block)
            block = []


def comment_sentences() -> List[str]:
    """Every usable sentence of the full-line ``#`` comments of the standard library's ``.py`` files
    (its tests' included: they explain the library in prose too), deduplicated, in a fixed shuffled
    order. About a second."""
    found: Dict[str, None] = {}
    for path in _stdlib_files(_NOT_STDLIB):
        _add_sentences(_comment_paragraphs(path), found)
    return _shuffled(found)


def package_folder(name: str) -> str:
    """The folder of the installed top-level package ``name``, found without importing it.
    ValueError naming it when it is not an installed package of Python files."""
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not os.path.isdir(locations[0]):
        raise ValueError(f"packages: {name!r} is not an installed package (a folder of .py files); "
                         "give top-level import names such as 'torch' or 'transformers'")
    return locations[0]


def package_sentences(names: Sequence[str]) -> List[str]:
    """Every usable sentence of the docstrings and full-line comments of the installed packages
    ``names`` (import names, e.g. ``["torch", "transformers"]``: every ``.py`` file in their folders,
    parsed, not imported), deduplicated, in a fixed shuffled order. What a package holds depends on
    its version: `digest` tells two lists apart. ValueError before any reading when a name is not an
    installed package."""
    folders = [package_folder(name) for name in names]
    found: Dict[str, None] = {}
    for folder in folders:
        for path in _python_files(folder, {"__pycache__"}):
            _add_sentences(_docstring_paragraphs(path), found)
            _add_sentences(_comment_paragraphs(path), found)
    return _shuffled(found)


def training_corpus(heldout: int, packages: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """(training sentences, held-out sentences): the first ``heldout`` reference sentences held out;
    training is every other sentence of the three sources, none of the held-out ones, each once. It
    starts with the library's docstrings and the rest of the reference (where a calibration set is
    cut from), then the comments and the docstrings of the tests, IDLE and demos, then those of the
    installed ``packages`` (`package_sentences`)."""
    extra = package_sentences(packages)  # first: a bad name fails before the standard library is read
    rest, held = split(reference_sentences(), heldout)
    library, others = _docstring_sentences(tests=True)
    seen = set(held)
    training: List[str] = []
    for sentence in _shuffled(library) + rest + comment_sentences() + _shuffled(others) + extra:
        if sentence not in seen:
            seen.add(sentence)
            training.append(sentence)
    return training, held


def text_file_sentences(path: str) -> List[str]:
    """The non-empty lines of the UTF-8 text file ``path``, stripped, in file order (one text per
    line: a sentence, a paragraph, a document). ValueError when it has none."""
    with open(path, encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not text
        texts = [line.strip() for line in handle if line.strip()]
    if not texts:
        raise ValueError(f"the text file {path!r} has no non-empty line: give one text per line")
    return texts


def split(texts: List[str], heldout: int) -> Tuple[List[str], List[str]]:
    """(training texts, the first ``heldout`` texts): ValueError when fewer than ``heldout`` + 1."""
    if heldout < 1 or len(texts) <= heldout:
        raise ValueError(f"need more than {heldout} texts to hold {heldout} out, got {len(texts)}")
    return texts[heldout:], texts[:heldout]


def digest(texts: List[str]) -> str:
    """A short hash of ``texts`` in order: two runs used the same texts iff equal."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
