"""Reading pipeline.yaml into a validated ``Pipeline``, with every problem located at FILE:LINE:COL.

Loading is all-or-nothing: a caller gets a whole valid pipeline or a ``SpecError`` listing every
problem, so a broken file is never half-applied. Bytes validated before are read back from their
record (levers.pipeline.validated): the parser (ruamel.yaml) is imported only to parse, and a
command that reads an unchanged file does not load it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

from levers.errors import SpecError, SpecProblem, UsageError
from levers.pipeline import validated

if TYPE_CHECKING:
    from pydantic import BaseModel
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.reader import ReaderError

    from levers.pipeline.model import Pipeline
    from levers.pipeline.options import RefusedOptions
    from levers.pipeline.outline import PipelineOutline

Loc = Sequence[str | int]

# A pipeline file is a few KB; 256 phases with every key spelt out stay under 100 KB. The size is
# checked before parsing, so a huge file costs one read of this many bytes.
MAX_FILE_BYTES = 1_000_000


class LoadedPipeline:
    """A valid pipeline and where it came from. ``digest`` changes whenever the file's bytes do;
    ``text`` is those bytes (None for a version kept as JSON: the last good one).

    Read back from its validated record, the pipeline is validated with the model when ``spec`` is
    first asked for, and ``outline`` (all `levers status` reads) comes without the model."""

    def __init__(
        self,
        path: Path,
        digest: str,
        spec: Pipeline | None = None,
        text: bytes | None = None,
        record: validated.Record | None = None,
    ) -> None:
        assert spec is not None or (record is not None and text is not None), "a pipeline or its record"
        self.path, self.digest, self.text = path, digest, text
        self._spec, self._record = spec, record

    def __repr__(self) -> str:
        return f"LoadedPipeline(path={self.path!r}, digest={self.digest[:12]!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LoadedPipeline):
            return NotImplemented
        return (self.path, self.digest) == (other.path, other.digest) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash((self.path, self.digest))

    @functools.cached_property
    def spec(self) -> Pipeline:
        if self._spec is not None:
            return self._spec
        assert self._record is not None and self.text is not None
        # a record that no longer validates (it is checked as a stranger's would be) is a miss: the
        # bytes it was made from validated, and validate again
        return validated.spec_of(self._record) or parse_pipeline(self.text, self.path).spec

    @functools.cached_property
    def outline(self) -> PipelineOutline:
        from levers.pipeline.outline import outline_of

        recorded = self._record.outline if self._record is not None else None
        return recorded or outline_of(self.spec)

    @functools.cached_property
    def settings(self) -> dict[str, Any]:
        """Every setting, defaults included, as JSON would hold them (what `levers get` reads)."""
        recorded = self._record.settings if self._record is not None else None
        return recorded if recorded is not None else self.spec.model_dump(mode="json")

    @property
    def project_dir(self) -> Path:
        return self.path.parent

    @property
    def state_dir(self) -> Path:
        return state_dir_of(self.path)


def state_dir_of(pipeline_path: Path) -> Path:
    """Where levers keeps local state for a pipeline file: ``.levers/`` beside it."""
    return pipeline_path.resolve().parent / ".levers"


def read_capped(path: Path) -> bytes:
    """The file's bytes, but no more than one past ``MAX_FILE_BYTES``: enough to tell it is too big.
    Raises OSError."""
    with path.open("rb") as handle:
        return handle.read(MAX_FILE_BYTES + 1)


def too_big(raw: bytes) -> str | None:
    """Why ``raw`` is refused before parsing, or None."""
    if len(raw) <= MAX_FILE_BYTES:
        return None
    return f"the file is larger than {MAX_FILE_BYTES:,} bytes, the most a pipeline file may be"


def load_pipeline(path: Path, check_imports: bool = False, check_options: bool = False) -> LoadedPipeline:
    """Read, parse and validate ``path``; with ``check_imports``, import every handler too; with
    ``check_options`` (implied by ``check_imports``), check each phase's options against the
    model its handler's module declares, importing the handlers' modules.

    Without either, bytes validated before are read from their record instead of parsed again."""
    try:
        raw = read_capped(path)
    except FileNotFoundError:
        raise UsageError(f"no pipeline file at {path}", fix="create one or pass -f FILE") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if check_imports or check_options:
        return parse_pipeline(raw, path, check_imports, check_options)
    resolved, digest = path.resolve(), hashlib.sha256(raw).hexdigest()
    record = validated.recall(state_dir_of(resolved), resolved, digest)
    if record is not None:
        return LoadedPipeline(path=resolved, digest=digest, text=raw, record=record)
    loaded = parse_pipeline(raw, path)
    validated.keep(loaded.state_dir, loaded.path, loaded.digest, loaded.spec)
    return loaded


def parse_pipeline(
    raw: bytes, path: Path, check_imports: bool = False, check_options: bool = False
) -> LoadedPipeline:
    """Validate the bytes of a pipeline file; ``path`` names it in errors and anchors relative paths.
    ``check_imports`` and ``check_options`` as for ``load_pipeline``."""
    from pydantic import ValidationError

    from levers.pipeline.model import Pipeline, cross_checks
    from levers.pipeline.options import refused_options

    shown = _shown_name(path)
    refused = too_big(raw)
    if refused:
        raise SpecError([SpecProblem(shown, 1, 1, refused)])
    tree = _parse_yaml(raw, shown)
    try:
        spec = Pipeline.model_validate(_plain(tree))
    except ValidationError as exc:
        raise SpecError(_in_file_order([_locate(tree, shown, err) for err in exc.errors()])) from None
    problems = [_problem(tree, shown, loc, message) for loc, message in cross_checks(spec)]
    if (check_imports or check_options) and not problems:
        ensure_importable_from(path.parent)
        if check_imports:
            problems = [_problem(tree, shown, path, message) for path, message in handler_problems(spec)]
        for phase_options in refused_options(spec):
            problems += _options_problems(tree, shown, phase_options)
    if problems:
        raise SpecError(_in_file_order(problems))
    return LoadedPipeline(path=path.resolve(), spec=spec, digest=hashlib.sha256(raw).hexdigest(), text=raw)


def read_tree(text: str, path: Path, yaml: YAML) -> CommentedMap:
    """The round-trip tree of a pipeline file's text (comments and positions kept), loaded by
    ``yaml`` (from ``round_trip_yaml``, set up as the caller will write it back)."""
    return _parse_yaml(text, _shown_name(path), yaml)


def ensure_importable_from(project_dir: Path) -> None:
    """Let handlers in modules beside pipeline.yaml import, as they would from that directory."""
    entry = str(project_dir.resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)


def import_handler(dotted: str) -> Callable[..., Any]:
    """The function named by 'module:function'. Raises ImportError or AttributeError."""
    module_name, _, attr = dotted.partition(":")
    function = getattr(importlib.import_module(module_name), attr)
    if not callable(function):
        raise TypeError(f"{dotted} is not callable")
    return function  # type: ignore[no-any-return]


def handler_problems(spec: Pipeline) -> list[tuple[Loc, str]]:
    """(key path, message) for every handler, the summary function and preloaded module that
    cannot be imported."""
    named: list[tuple[Loc, str, str]] = [
        (("phases", name, "handler"), "handler", phase.handler) for name, phase in spec.phases.items()
    ]
    if spec.summary:
        named.append((("summary",), "summary", spec.summary))
    named += [(("preload", i), "preload", module) for i, module in enumerate(spec.preload)]
    problems: list[tuple[Loc, str]] = []
    for path, what, dotted in named:
        try:
            import_handler(dotted) if ":" in dotted else importlib.import_module(dotted)
        except Exception as exc:  # any error while importing user code is a problem to report
            problems.append((path, f"{what} {dotted!r} cannot be imported: {type(exc).__name__}: {exc}"))
    return problems


def _in_file_order(problems: list[SpecProblem]) -> list[SpecProblem]:
    return sorted(problems, key=lambda p: (p.line, p.column))


def _shown_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _parse_yaml(raw: bytes | str, shown: str, yaml: YAML | None = None) -> CommentedMap:
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import MarkedYAMLError
    from ruamel.yaml.reader import ReaderError

    from levers.pipeline.safe_yaml import BudgetExceeded, round_trip_yaml

    try:
        tree = (yaml or round_trip_yaml()).load(raw)
    except BudgetExceeded as exc:
        mark = exc.problem_mark
        raise SpecError([SpecProblem(shown, mark.line + 1, mark.column + 1, exc.problem)]) from None
    except ReaderError as exc:
        line, col = _reader_position(raw, exc)
        raise SpecError([SpecProblem(shown, line, col, _reader_message(exc))]) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        context = exc.context or ""
        if context and exc.context_mark is not None and exc.context_mark.line + 1 != line:
            # noticed a line or more after its cause: an unclosed [ or {, or a quote
            context += f" started at line {exc.context_mark.line + 1}"
        problem = f"{exc.problem or 'invalid YAML'}" + (f" ({context})" if context else "")
        raise SpecError([SpecProblem(shown, line, col, f"YAML syntax: {problem}")]) from None
    except Exception as exc:  # ruamel raises a few unmarked errors (bad encodings, for one)
        raise SpecError([SpecProblem(shown, 1, 1, f"YAML syntax: {exc}")]) from None
    if tree is None:
        raise SpecError([SpecProblem(shown, 1, 1, "the file is empty; a pipeline needs at least phases:")])
    if not isinstance(tree, CommentedMap):
        raise SpecError([SpecProblem(shown, 1, 1, "the top level must be a mapping with phases:")])
    return tree


def _reader_message(exc: ReaderError) -> str:
    if exc.encoding == "unicode":  # a character YAML does not allow (NUL, most control characters)
        return f"character #x{exc.character:04x} is not allowed in a YAML file; remove it"
    return f"byte #x{exc.character:02x} is not {exc.encoding} ({exc.reason}); save the file as UTF-8"


def _reader_position(raw: bytes | str, exc: ReaderError) -> tuple[int, int]:
    """Line and column of a ReaderError, whose position counts characters of the decoded text when
    a character is not allowed, and bytes when the bytes do not decode."""
    if isinstance(raw, str):
        before = raw[: exc.position]
    elif exc.encoding == "unicode":
        codec = {b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be"}.get(raw[:2], "utf-8")
        before = raw.decode(codec, errors="replace")[: exc.position]
    else:
        before = raw[: exc.position].decode("utf-8", errors="replace")
    return before.count("\n") + 1, len(before) - before.rfind("\n")


def _plain(node: Any) -> Any:
    from ruamel.yaml.scalarbool import ScalarBoolean

    if isinstance(node, ScalarBoolean):  # an anchored true: an int to Python, a boolean to YAML
        return bool(node)
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _options_problems(tree: CommentedMap, shown: str, refused: RefusedOptions) -> list[SpecProblem]:
    """The problems of one phase's options, located in the file like every other."""
    where = ("phases", refused.phase, "options")
    if refused.model is None:
        return [_problem(tree, shown, ("phases", refused.phase, "handler"), refused.message)]
    return [_locate(tree, shown, err, refused.model, where) for err in refused.errors]


def _locate(
    tree: CommentedMap, shown: str, err: Any, root: type[BaseModel] | None = None, prefix: Loc = ()
) -> SpecProblem:
    """``err`` of validating ``root`` (the pipeline's model by default) against the part of the
    file at ``prefix``, as a problem."""
    inner = [part for part in err["loc"] if part != "[key]"]
    loc = [*prefix, *inner]
    at_value = err["type"] not in _AT_KEY and "[key]" not in err["loc"]
    line, col = _position(tree, loc, at_value)
    allowed = _allowed_keys(inner[:-1], root) if err["type"] == "extra_forbidden" else []
    return SpecProblem(shown, line, col, _message(err, loc, allowed))


# errors about a key, or about a whole mapping, rather than about one value
_AT_KEY = ("extra_forbidden", "missing", "too_long", "workers_total")


def _message(err: Any, loc: list[str | int], allowed: list[str]) -> str:
    """One line for one of pydantic's errors; ``allowed`` are the keys an unknown key may mean."""
    from levers.pipeline.dotted import did_you_mean

    where = ".".join(str(p) for p in loc) or "pipeline"
    if err["type"] == "extra_forbidden":
        return f"unknown key {where!r}{did_you_mean(str(loc[-1]), allowed)}"
    if err["type"] == "missing":
        return f"{where} is required"
    if err["type"] == "less_than_equal":
        bound = _shown_value(_whole_if_exact(err["ctx"]["le"]))
        return f"{where}: {_shown_value(err['input'])} is above the bound of {bound}; set at most {bound}"
    if err["type"] == "greater_than_equal":
        bound = _shown_value(_whole_if_exact(err["ctx"]["ge"]))
        return f"{where}: {_shown_value(err['input'])} is below the bound of {bound}; set at least {bound}"
    if err["type"] == "greater_than":
        bound = _shown_value(_whole_if_exact(err["ctx"]["gt"]))
        return f"{where}: {_shown_value(err['input'])} is not above {bound}; set more than {bound}"
    if err["type"] in ("model_type", "dict_type"):
        return f"{where}: expected a mapping, not {_shown_value(err['input'])}"
    if err["type"] == "too_long":
        bound = err["ctx"]["max_length"]
        return f"{where}: {len(err['input'])} entries is above the bound of {bound}; keep at most {bound}"
    if err["type"] == "literal_error":
        return f"{where}: {_shown_value(err['input'])} is not one of {err['ctx']['expected']}"
    if err["type"] in _EXPECTED:
        return f"{where}: expected {_EXPECTED[err['type']]}, not {_shown_value(err['input'])}"
    return f"{where}: {err['msg']}"


# pydantic's type errors for numbers and booleans, said with what was written instead (true is not
# a number, 1 is not a boolean)
_EXPECTED = {
    "int_type": "a whole number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


def _whole_if_exact(bound: float) -> float:
    """A float field's bound, 86400.0, as the 86400 the file would say."""
    return int(bound) if isinstance(bound, float) and bound.is_integer() else bound


def _shown_value(value: Any) -> str:
    """``value`` as the file spells it, cut short: it may be anything the file holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _problem(tree: CommentedMap, shown: str, loc: Loc, message: str) -> SpecProblem:
    line, col = _position(tree, loc)
    return SpecProblem(shown, line, col, message)


def _position(tree: CommentedMap, loc: Loc, at_value: bool = False) -> tuple[int, int]:
    """1-based line and column of the deepest node of ``loc`` that exists in the file.

    ``at_value`` points at the value of the last key rather than at the key itself.
    """
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    node: Any = tree
    line, col = 1, 1
    for index, part in enumerate(loc):
        if isinstance(node, CommentedMap) and part in node:
            last = index == len(loc) - 1
            # an empty value has no position of its own: ruamel gives the next token's
            on_value = last and at_value and node[part] is not None
            key_line, key_col = node.lc.value(part) if on_value else node.lc.key(part)
            line, col = key_line + 1, key_col + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            item_line, item_col = node.lc.item(part)
            line, col = item_line + 1, item_col + 1
            node = node[part]
        else:
            break
    return line, col


def _allowed_keys(loc: Loc, root: type[BaseModel] | None = None) -> list[str]:
    """The keys ``root`` (the pipeline's model by default) allows in the mapping at ``loc`` (for
    did-you-mean)."""
    from pydantic import BaseModel

    from levers.pipeline.model import Pipeline

    current: Any = root or Pipeline
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Optional[...] so the model inside shows."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation
