"""Choosing the entry phase of a document from its file type and how it arrives."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from levers.documents.routing import entry_phase
from levers.errors import EXIT_BAD_INPUT, DocumentError
from levers.pipeline.loading import load_pipeline, parse_pipeline
from levers.pipeline.model import Pipeline

REAL_PIPELINE = Path(__file__).resolve().parents[1] / "pipeline.yaml"


def spec_of(text: str) -> Pipeline:
    return parse_pipeline(textwrap.dedent(text).encode(), Path("pipeline.yaml")).spec


@pytest.fixture
def two_entries() -> Pipeline:
    """Like the real pipeline: a files entry and a bytes entry, both feeding one phase."""
    return spec_of(
        """\
        phases:
          extraction:
            handler: m:extract
            accepts: [pdf, txt]
            next: chunking
          ingest_extract:
            handler: m:ingest
            input: bytes
            accepts: [pdf, html]
            next: chunking
          chunking:
            handler: m:chunk
        """
    )


@pytest.mark.parametrize(("input_kind", "phase"), [("files", "extraction"), ("bytes", "ingest_extract")])
def test_the_real_pipeline_routes_a_pdf_by_how_it_arrives(input_kind: str, phase: str) -> None:
    spec = load_pipeline(REAL_PIPELINE).spec

    assert entry_phase(spec, "report.pdf", input_kind) == phase


def test_a_pdf_file_goes_to_the_files_phase(two_entries: Pipeline) -> None:
    assert entry_phase(two_entries, "report.pdf", "files") == "extraction"


def test_pdf_bytes_go_to_the_bytes_phase(two_entries: Pipeline) -> None:
    assert entry_phase(two_entries, "report.pdf", "bytes") == "ingest_extract"


def test_the_extension_is_matched_case_insensitively(two_entries: Pipeline) -> None:
    assert entry_phase(two_entries, "REPORT.PDF", "files") == "extraction"


def test_a_type_only_one_phase_accepts_goes_there_whatever_the_input(two_entries: Pipeline) -> None:
    # input kind is a preference among phases that accept the type, never a reason to refuse it
    assert entry_phase(two_entries, "notes.txt", "bytes") == "extraction"
    assert entry_phase(two_entries, "page.html", "files") == "ingest_extract"


def test_an_unsupported_type_is_refused_listing_the_accepted_types(two_entries: Pipeline) -> None:
    with pytest.raises(DocumentError) as caught:
        entry_phase(two_entries, "setup.exe", "files")

    assert caught.value.message == "setup.exe: unsupported type '.exe'"
    assert caught.value.fix == "the pipeline accepts .html, .pdf, .txt"
    assert caught.value.exit_code == EXIT_BAD_INPUT


@pytest.mark.parametrize("name", ["README", ".bashrc"])
def test_a_name_without_an_extension_is_refused_as_such(two_entries: Pipeline, name: str) -> None:
    with pytest.raises(DocumentError, match=r"unsupported type '\(no extension\)'"):
        entry_phase(two_entries, name, "files")


@pytest.mark.parametrize("name", ["data.parquet", "README", "archive.tar.gz"])
def test_a_star_phase_accepts_anything(name: str) -> None:
    spec = spec_of(
        """\
        phases:
          anything:
            handler: m:take
            accepts: ['*']
        """
    )

    assert entry_phase(spec, name, "files") == "anything"
    assert entry_phase(spec, name, "bytes") == "anything"


def test_a_pipeline_with_only_a_files_phase_takes_bytes_too() -> None:
    spec = spec_of(
        """\
        phases:
          extraction:
            handler: m:extract
            accepts: [pdf]
        """
    )

    assert entry_phase(spec, "report.pdf", "bytes") == "extraction"
