"""A validated pipeline kept beside its file, so that commands which only read it skip the parse.

Parsing pipeline.yaml (ruamel.yaml's round-trip parser, every problem located at FILE:LINE:COL)
costs more than `levers status` does with the result. A load that validates the file keeps the
pipeline it got in ``.levers/validated/<file name>.json``, with the SHA-256 of the file's bytes and
of the model's source, the pipeline's outline (levers.pipeline.outline), and its settings with
their defaults. A later load of the same bytes under the same model reads that record, and
validates what it holds only when the pipeline itself is asked for: `levers status` reads the
outline alone, and `levers get` the settings.

The record is levers' own state, as trusted as the rest of ``.levers/`` and checked all the same:
it counts only if it is a regular file of this user's that nobody else may write, no larger than a
pipeline could make it, and its digests match the bytes read now and the model in use; what it
holds must pass the model's validation and the checks across phases again (the pipeline), or be
an outline field by field. Anything else is a miss:
the file is parsed and validated in full, its errors reported as always. Only a valid file is
kept, and only where ``.levers/`` already exists (a command that reads creates no state dir).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from levers.files import write_atomically

if TYPE_CHECKING:
    from levers.pipeline.model import Pipeline
    from levers.pipeline.outline import PipelineOutline

RECORDS = "validated"
# A pipeline file is at most 1 MB (safe_yaml.MAX_FILE_BYTES); its defaults spelt out stay well
# within a few times that. A larger record is not one levers wrote.
MAX_RECORD_BYTES = 8_000_000
# What a record's meaning depends on: the model validates it, the outline and this module write it.
DIGESTED_SOURCES = ("model.py", "outline.py", "validated.py")


@functools.cache
def model_digest() -> str | None:
    """SHA-256 of the sources of the model, the outline and the record (None where they are not
    there to read: no record is kept)."""
    try:
        sources = [Path(__file__).with_name(name).read_bytes() for name in DIGESTED_SOURCES]
    except OSError:
        return None
    return hashlib.sha256(b"\0".join(sources)).hexdigest()


def record_path(state_dir: Path, pipeline: Path) -> Path:
    return state_dir / RECORDS / f"{pipeline.name}.json"


@dataclass(frozen=True)
class Record:
    """A record that matches the bytes read now and the model in use: what the file gave (``given``,
    validated only when the pipeline is asked for), its outline, and its settings with every default
    spelt out, as `levers get` shows them (each None: not a sound one)."""

    given: Any
    outline: PipelineOutline | None
    settings: dict[str, Any] | None


def recall(state_dir: Path, pipeline: Path, digest: str) -> Record | None:
    """The record of bytes of SHA-256 ``digest``, if one of this user's is kept for this model."""
    model = model_digest()
    saved = _read_own(record_path(state_dir, pipeline))
    if model is None or not isinstance(saved, dict):
        return None
    if saved.get("digest") != digest or saved.get("model") != model:
        return None
    from levers.pipeline.outline import outline_from_json

    outline = outline_from_json(saved.get("outline"))
    return Record(saved.get("spec"), outline, _settings(saved.get("settings"), outline))


def _settings(data: Any, outline: PipelineOutline | None) -> dict[str, Any] | None:
    """The settings ``keep`` wrote, if they have the outline's phases, each with its levers."""
    if outline is None or not isinstance(data, dict) or not isinstance(phases := data.get("phases"), dict):
        return None
    if list(phases) != list(outline.phases) or not all(
        isinstance(phase, dict) and isinstance(phase.get("levers"), dict) for phase in phases.values()
    ):
        return None
    return data


def spec_of(record: Record) -> Pipeline | None:
    """The pipeline ``record`` holds, if it passes the model's validation and the checks across
    phases again; None otherwise."""
    from pydantic import ValidationError

    from levers.pipeline.model import Pipeline, cross_checks

    try:
        spec = Pipeline.model_validate(record.given)
    except ValidationError:
        return None
    return None if cross_checks(spec) else spec


def keep(state_dir: Path, pipeline: Path, digest: str, spec: Pipeline) -> None:
    """Record ``spec``, validated from bytes of SHA-256 ``digest``, if it reads back as itself;
    never fails a load."""
    model = model_digest()
    if model is None or not state_dir.is_dir():
        return
    # what the file set, as it set it: validated again, it gives the same defaults, and the same
    # fields counted as given (an expect: with seconds alone stays valid)
    try:
        given = json.loads(json.dumps(spec.model_dump(mode="json", exclude_unset=True)))
        if type(spec).model_validate(given) != spec:
            return  # options JSON cannot say as they are (a YAML date, say): parsed each time
    except ValueError:  # pydantic's ValidationError among them
        return
    from levers.pipeline.outline import outline_json, outline_of

    record = {
        "digest": digest, "model": model, "spec": given, "outline": outline_json(outline_of(spec)),
        "settings": spec.model_dump(mode="json"),
    }  # fmt: skip
    with contextlib.suppress(OSError):  # a read-only checkout, a full disk: loads just parse again
        write_atomically(record_path(state_dir, pipeline), json.dumps(record).encode())


def _read_own(path: Path) -> Any:
    """The JSON of ``path`` if it is a regular file of this user's that nobody else may write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        mine = stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
        if not mine or st.st_size > MAX_RECORD_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as handle:
            return json.loads(handle.read(MAX_RECORD_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
