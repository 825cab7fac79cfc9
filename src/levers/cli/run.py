"""`levers run`: the whole pipeline in one command, from documents in to a summary out.

It starts the embedded server if none runs, supervises the workers in this process, submits
the documents, waits with a progress bar, prints the summary, and stops everything it started.
"""

from __future__ import annotations

from pathlib import Path

from levers.cli import console
from levers.documents.ledger import DocStatus, DocumentRecord, Ledger
from levers.documents.store import apart_from_forks, project_store
from levers.documents.submission import Outcome, Submitter
from levers.errors import UsageError
from levers.pipeline.loading import import_handler
from levers.server.connection import embedded_server
from levers.server.embedded import servers_under
from levers.server.project import Project, open_project
from levers.supervisor import processes as pool


def run_documents(
    file: Path | None,
    paths: list[str],
    force: bool,
    priority: str = "normal",
    keep_versions: bool = False,
    reuse: bool = True,
) -> bool:
    """Process ``paths`` end to end, in the lane of ``priority``, older versions' output kept with
    ``keep_versions`` (without ``reuse``: every phase does the work, as Submitter.submit_paths
    says); True when every document finished without failing."""
    project = open_project(file, check_imports=True, start=True)
    # servers that phases start during the run (a graph database, say) are stopped at its end,
    # as is levers' own embedded Redis when this run started it
    already_running = {server.data_dir for server in servers_under(project.state_dir)}
    try:
        submitter = Submitter(project.loaded, project.connection)
        outcomes = apart_from_forks(
            project.loaded.spec.store,
            lambda: submitter.submit_paths(paths, force, priority, keep_versions=keep_versions, reuse=reuse),
        )
        for outcome in outcomes:
            if outcome.error or (outcome.skipped and not outcome.doc_id):
                console.explain(outcome)
        doc_ids = list(dict.fromkeys(o.doc_id for o in outcomes if o.doc_id))
        if not doc_ids:
            raise UsageError("no document to process", fix="pass files or directories the pipeline accepts")
        records = _supervise_until_finished(project, doc_ids)
        console.run_summary(records, list(project.loaded.spec.phases), _given_paths(outcomes))
        if project.loaded.spec.summary:
            _describe_results(project, records)
        return all(o.ok for o in outcomes) and all(r.status is DocStatus.DONE for r in records)
    finally:
        for server in servers_under(project.state_dir):
            if server.data_dir not in already_running:
                server.stop()
        if project.started_server:
            embedded_server(project.loaded).stop()


def _given_paths(outcomes: list[Outcome]) -> dict[str, list[str]]:
    """Each document's paths as the user gave them: one content may be under several."""
    paths: dict[str, list[str]] = {}
    for outcome in outcomes:
        if outcome.doc_id and outcome.source not in paths.setdefault(outcome.doc_id, []):
            paths[outcome.doc_id].append(outcome.source)
    return paths


def _describe_results(project: Project, records: list[DocumentRecord]) -> None:
    """Hand the results to the pipeline's ``summary`` function and show what it says of them."""
    spec = project.loaded.spec
    assert spec.summary is not None
    store = project_store(project.loaded)
    documents = [
        {
            "id": r.id, "name": r.name, "status": str(r.status), "error": r.error,
            "outputs": {p: store.output(r.id, p) for p in r.phases if store.has_output(r.id, p)},
        }
        for r in records
    ]  # fmt: skip
    try:
        text = import_handler(spec.summary)(documents, spec.model_dump(mode="json"), project.state_dir)
    except Exception as exc:  # the summary is a courtesy: its failure must not fail the run
        console.error(f"summary {spec.summary} failed: {type(exc).__name__}: {exc}")
        return
    console.text_block(str(text))


def _supervise_until_finished(project: Project, doc_ids: list[str]) -> list[DocumentRecord]:
    ledger = Ledger(project.connection, project.loaded.spec.name)
    # the progress bar owns the terminal: workers and supervisor log to .levers/logs
    supervisor = pool.build_supervisor(project, logs=pool.LogOptions(log_dir=project.state_dir / "logs"))
    pool.SignalLatch(supervisor).install()
    with console.DocumentProgress(len(doc_ids)) as progress:

        def all_finished() -> bool:
            records = ledger.get_many(doc_ids)
            progress.update(records)
            return all(r is not None and r.status in (DocStatus.DONE, DocStatus.FAILED) for r in records)

        pool.run(supervisor, project.connection, until=all_finished, revive=pool.revive_embedded(project))
    return [r for r in ledger.get_many(doc_ids) if r is not None]
