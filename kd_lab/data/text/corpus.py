"""Named text corpora: two that ship with every Python install (no download) and the user's own files.

A ``Corpus`` is a list of documents plus what is needed to record exactly what was read: a name, where it
came from, the Python version for the built-in ones (their text changes between releases) and a sha256 of
the documents themselves, which the tokenizer and packing caches are keyed by. See docs/text-data.md.
"""

import ast
import hashlib
import json
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kd_lab.errors import KDLabError

DEFAULT_CORPUS = "pydoc_topics"
CORPORA = ("pydoc_topics", "stdlib_docstrings", "files")
USER_SUFFIXES = (".txt", ".jsonl")
# Not the standard library proper: its own tests, the IDLE app, and whatever pip installed next to it.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__"})
_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: list[str]
    source: str  # a module name or a path, for the record
    python_version: str | None = None  # set for the built-in corpora, whose text is Python's own

    @cached_property
    def sha256(self) -> str:
        """A digest of the documents and their boundaries: same text, same split into documents, same digest."""
        digest = hashlib.sha256()
        for doc in self.documents:
            data = doc.encode()
            digest.update(len(data).to_bytes(8, "big"))  # the length prefix keeps ["ab", "c"] != ["a", "bc"]
            digest.update(data)
        return digest.hexdigest()

    @property
    def characters(self) -> int:
        return sum(len(doc) for doc in self.documents)


def load_corpus(corpus: str = DEFAULT_CORPUS, path: str | Path | None = None, jsonl_field: str = "text") -> Corpus:
    """``corpus`` names a built-in corpus; a ``path`` selects the user's files instead (``corpus=files``)."""
    if path is not None:
        if corpus not in (DEFAULT_CORPUS, "files"):
            raise KDLabError(
                f"data.corpus={corpus} and data.path={path} both choose the text; set data.corpus=files to read "
                "the path, or data.path=null to use the built-in corpus."
            )
        found = _user_corpus(Path(path), jsonl_field)
    elif corpus == "pydoc_topics":
        found = _pydoc_topics()
    elif corpus == "stdlib_docstrings":
        found = _stdlib_docstrings()
    elif corpus == "files":
        raise KDLabError("data.corpus=files reads the user's own text: set data.path to a .txt/.jsonl file or a dir.")
    else:
        raise KDLabError(f"data.corpus={corpus!r} is not one of {CORPORA}; 'files' reads data.path.")
    return _non_empty(found)


def _python_version() -> str:
    return f"{sys.implementation.name} {sys.version.split()[0]}"


def _pydoc_topics() -> Corpus:
    from pydoc_data.topics import topics  # the text behind help("assert"), help("if"), ...

    return Corpus("pydoc_topics", [topics[key] for key in sorted(topics)], "pydoc_data.topics", _python_version())


def _stdlib_docstrings() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = [doc for _, doc in stdlib_modules(root)]
    return Corpus("stdlib_docstrings", documents, str(root), _python_version())


def stdlib_modules(root: Path) -> Iterator[tuple[str, str]]:
    """``(relative path, docstrings)`` of every stdlib module with a docstring, in sorted path order."""
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py"))
    for rel, file in files:
        if STDLIB_SKIP_DIRS.intersection(rel.split("/")[:-1]):
            continue
        try:
            with warnings.catch_warnings():  # invalid escapes in old modules warn; they still parse
                warnings.simplefilter("ignore")
                tree = ast.parse(file.read_bytes(), filename=rel)
        except (SyntaxError, ValueError):  # not Python 3 source (none in 3.10-3.13 after the skip rule)
            continue
        docs = list(_docstrings(tree))
        if docs:
            yield rel, "\n\n".join(docs)


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings in source order: the module's, then each class and function as it appears."""
    if isinstance(node, _DEFS):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            yield doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _BLOCKS):  # defs sit only in statement bodies: skip the expressions
            yield from _docstrings(child)


def _user_corpus(path: Path, jsonl_field: str) -> Corpus:
    if not path.exists():
        raise KDLabError(f"data.path={path} does not exist; point it at a .txt or .jsonl file or a directory of them.")
    if path.is_dir():
        files = sorted(
            (p.relative_to(path).as_posix(), p)
            for p in path.rglob("*")
            if p.is_file() and p.suffix in USER_SUFFIXES and not _hidden(p.relative_to(path))
        )
        if not files:
            raise KDLabError(f"data.path={path} holds no .txt or .jsonl files (searched recursively).")
    elif path.suffix in USER_SUFFIXES:
        files = [(path.name, path)]
    else:
        raise KDLabError(
            f"data.path={path} is not a .txt or .jsonl file; kd-lab reads .txt (one document per file) and "
            ".jsonl (one document per line) files, or a directory of them."
        )
    documents = []
    for _, file in files:
        text = read_utf8(file)
        documents.extend(_jsonl_documents(file, text, jsonl_field) if file.suffix == ".jsonl" else [text])
    return Corpus("files", documents, str(path.resolve()))


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)  # .git, .ipynb_checkpoints, editor backups


def read_utf8(file: Path) -> str:
    data = file.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark is not text
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        raise KDLabError(
            f"{file} is not UTF-8: byte 0x{data[offset]:02x} at offset {offset} ({e.reason}); re-encode it as "
            f"UTF-8 (e.g. iconv -f latin1 -t utf-8 {file.name}) or remove it from data.path."
        ) from e


def _jsonl_documents(file: Path, text: str, field: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.split("\n"), start=1):  # "\n" only: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise KDLabError(
                f"{file} line {number} is not JSON ({e.msg} at column {e.colno}); each line of a .jsonl file "
                "must be one JSON object."
            ) from e
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else f"a JSON {_json_type(record)}"
            raise KDLabError(
                f"{file} line {number} has no {field!r} field (found: {keys or 'no keys'}); set data.jsonl_field "
                "to the field that holds the text."
            )
        if not isinstance(record[field], str):
            raise KDLabError(
                f"{file} line {number}: field {field!r} is a JSON {_json_type(record[field])}, not a string."
            )
        documents.append(record[field])
    return documents


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _non_empty(corpus: Corpus) -> Corpus:
    """Whitespace-only documents carry no tokens worth learning; an all-empty corpus is a mistake."""
    kept = [doc for doc in corpus.documents if doc.strip()]
    if not kept:
        raise KDLabError(
            f"corpus {corpus.name!r} from {corpus.source} is empty: its {len(corpus.documents)} document(s) hold no "
            "text other than whitespace; add text to the files or choose another data.path."
        )
    return Corpus(corpus.name, kept, corpus.source, corpus.python_version)
